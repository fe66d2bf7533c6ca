"""A trained frozen encoder for the SupCon term on the digits: the tiny CLIP tower, trained.

The multi-style benchmark's SupCon term embeds x̂0 with a frozen image encoder; the paper
(arXiv 2412.03957) pre-trains that representation with SupCon on the labels. On the
digits the published CLIP cannot be downloaded, so the first runs used the tiny tower
with random weights (`train.supcon_encoder="tiny"`). This script trains that same tower
(`style_contrast.TINY_VISION`, the same `style_contrast.embed`
preprocessing) with `supcon.supcon` over the rendering labels of `data/digits.py`
(plain, palette, stripes, styled), two views per image: the image, and the image with
Gaussian noise of a random scale and a random blur (what an x̂0 at a high noise level
looks like). It writes a Hugging Face folder (`config.json` + `flax_model.msgpack`, Flax
names) that `train.supcon_encoder=<folder>` loads through `clip_embed.load_hf`, and
reports how well the embeddings separate the renderings on held-out digits (nearest
centroid, clean and noised views).

    python benchmarks/supcon_encoder.py --out /tmp/nsync-supcon-encoder
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsync_jax import style_contrast, supcon  # noqa: E402
from nsync_jax.data import digits  # noqa: E402
from nsync_jax.data.examples import to_pixels  # noqa: E402
from nsync_jax.evaluation import clip_embed  # noqa: E402

RENDERINGS = ("plain", "palette", "stripes", "styled")
RESOLUTION = 8


def rendered(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """NCHW pixels in [-1, 1] of `count` digits per rendering, and the rendering labels."""
    pixels, labels = [], []
    for k, rendering in enumerate(RENDERINGS):
        examples = digits.digits_examples(RESOLUTION, rendering, range(10), count, seed)
        pixels.append(to_pixels(examples.images))
        labels += [k] * len(examples.images)
    return np.concatenate(pixels), np.asarray(labels, np.int32)


def degrade(pixels: jax.Array, rng: jax.Array) -> jax.Array:
    """Noise of scale U(0, 0.6) and a blur mixed in by U(0, 1): an x̂0-like view."""
    noise_rng, scale_rng, blur_rng = jax.random.split(rng, 3)
    n = pixels.shape[0]
    scale = jax.random.uniform(scale_rng, (n, 1, 1, 1), maxval=0.6)
    side = pixels.shape[-1]
    small = jax.image.resize(pixels, pixels.shape[:2] + (side // 2, side // 2), "bilinear")
    blurred = jax.image.resize(small, pixels.shape, "bilinear")
    mix = jax.random.uniform(blur_rng, (n, 1, 1, 1))
    out = (1 - mix) * pixels + mix * blurred
    return jnp.clip(out + scale * jax.random.normal(noise_rng, pixels.shape), -1.0, 1.0)


def accuracy(embeddings: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> float:
    return float((np.argmax(embeddings @ centroids.T, axis=1) == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/nsync-supcon-encoder")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--count", type=int, default=200, help="training digits per rendering")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = style_contrast.SupconSettings(
        weight=1.0,
        projected=False,
        temperature=args.temperature,
        base_temperature=args.temperature,
        encoder=style_contrast.TINY_ENCODER,
        views="noise",
        view_template="",
    )
    encoder, params = style_contrast.load_encoder(settings, args.seed)
    pixels, labels = rendered(args.count, seed=0)
    test_pixels, test_labels = rendered(50, seed=1)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)

    def loss_fn(params, batch, batch_labels, rng):
        views = [batch, degrade(batch, rng)]
        features = jnp.stack([style_contrast.embed(encoder, params, v) for v in views], axis=1)
        return supcon.supcon(
            features, batch_labels, temperature=args.temperature, base_temperature=args.temperature
        )

    @jax.jit
    def step(params, opt_state, batch, batch_labels, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, batch_labels, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    embed = jax.jit(lambda p, x: style_contrast.embed(encoder, p, x))

    def evaluate(params, rng) -> dict[str, float]:
        train_embeddings = np.asarray(embed(params, pixels))
        centroids = np.stack([train_embeddings[labels == k].mean(0) for k in range(4)])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        clean = np.asarray(embed(params, test_pixels))
        noised = np.asarray(embed(params, degrade(jnp.asarray(test_pixels), rng)))
        return {
            "accuracy_clean": accuracy(clean, test_labels, centroids),
            "accuracy_degraded": accuracy(noised, test_labels, centroids),
            "loss": float(loss_fn(params, jnp.asarray(test_pixels), test_labels, rng)),
        }

    rng = jax.random.key(args.seed)
    before = evaluate(params, jax.random.key(99))
    print(f"random tower: {before}", flush=True)
    order = np.random.default_rng(args.seed)
    for i in range(args.steps):
        index = order.choice(len(pixels), args.batch, replace=False)
        rng, step_rng = jax.random.split(rng)
        params, opt_state, loss = step(params, opt_state, pixels[index], labels[index], step_rng)
        if (i + 1) % 100 == 0:
            print(f"step {i + 1}: loss {float(loss):.4f}", flush=True)
    after = evaluate(params, jax.random.key(99))
    print(f"trained tower: {after}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    config = {**encoder.config.to_dict(), "architectures": ["CLIPVisionModelWithProjection"]}
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(args.out, "flax_model.msgpack"), "wb") as f:
        f.write(serialization.msgpack_serialize(jax.device_get(params)))
    loaded_encoder, loaded = clip_embed.load_hf(args.out, metric="supcon")
    same = np.asarray(style_contrast.embed(loaded_encoder, loaded, test_pixels[:8]))
    np.testing.assert_allclose(same, np.asarray(embed(params, test_pixels[:8])), atol=1e-5)
    record = {"args": vars(args), "random_tower": before, "trained_tower": after}
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.out} (loads through clip_embed.load_hf)")


if __name__ == "__main__":
    main()
