"""Images in the style of a reference image: the trained encoder's tokens in the prompt.

For a content prompt c_t ("a house") and a reference image x, the styled prompt is c_t
through `style.prompt_template` (", in the style of sks."), and the encoder's tokens V(x)
are spliced in at the placeholder (`splice.py`): c_ts. Guidance:

- `sample.style_guidance` = 0 (the paper's default): plain classifier-free guidance on
  the styled prompt, ε = ε(∅) + s_t (ε(c_ts) − ε(∅)), s_t = `sample.guidance_scale`.
- `sample.style_guidance` = s_s > 0: dual guidance,
  ε = ε(∅) + s_t (ε(c_t) − ε(∅)) + s_s (ε(c_ts) − ε(c_t)),
  three UNet rows per image (the paper's variant: s_t = 7.5, s_s = 1).

Note s_s = 0 in the dual formula would drop the style altogether; 0 therefore means
"dual guidance off", not "no style".
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from nsync_jax import checkpoint, errors, models, runs, sampling, sharding
from nsync_jax.data.examples import resize_and_crop, to_pixels
from nsync_jax.style_encoder import encoder as encoder_lib
from nsync_jax.style_encoder import run as run_lib
from nsync_jax.style_encoder import splice

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def dual_guidance(text_scale: float, style_scale: float) -> Callable[[jax.Array], jax.Array]:
    """Combines predictions [B, 3, ...] of (∅, c_t, c_ts) as
    ε(∅) + s_t (ε(c_t) − ε(∅)) + s_s (ε(c_ts) − ε(c_t))."""
    s_t, s_s = jnp.float32(text_scale), jnp.float32(style_scale)

    def combine(predictions):
        uncond, text, styled = predictions[:, 0], predictions[:, 1], predictions[:, 2]
        return uncond + s_t * (text - uncond) + s_s * (styled - text)

    return combine


def make_style_generate_fn(
    model: models.StableDiffusion,
    encoder: encoder_lib.StyleEncoder,
    settings: sampling.SamplerSettings,
    style_guidance: float,
    placeholder_id: int,
):
    """`generate(params, encoder_params, styled_ids, text_ids, uncond_ids, style_pixels,
    image_seeds, seed) -> images` (module doc), to be jitted; `style_pixels` NCHW in
    [-1, 1], one reference per image; the rest as `sampling.make_generate_fn`."""
    if style_guidance < 0:
        raise errors.ConfigError(f"sample.style_guidance must be >= 0, got {style_guidance}")
    denoise = sampling.make_denoise_fn(model, settings)
    guided = settings.guidance_scale != 1.0 or style_guidance > 0

    def generate(params, encoder_params, styled_ids, text_ids, uncond_ids, style_pixels, *seeds):
        inputs = encoder_lib.tower_inputs(style_pixels, encoder.vision_config.image_size)
        tokens = encoder.apply({"params": encoder_params}, inputs)
        text_params = params["text_encoder"]
        styled = splice.encode_spliced(model, text_params, styled_ids, tokens, placeholder_id)
        if not guided:
            return denoise(params, styled[:, None], lambda p: p[:, 0], *seeds)
        uncond = model.encode_text(text_params, uncond_ids)
        uncond = jnp.broadcast_to(uncond, styled.shape).astype(styled.dtype)
        if style_guidance == 0:
            contexts = jnp.stack([uncond, styled], axis=1)
            return denoise(
                params, contexts, sampling.classifier_free(settings.guidance_scale), *seeds
            )
        text = model.encode_text(text_params, text_ids)
        contexts = jnp.stack([uncond, text, styled], axis=1)
        combine = dual_guidance(settings.guidance_scale, style_guidance)
        return denoise(params, contexts, combine, *seeds)

    return generate


@dataclasses.dataclass
class StyleRun:
    """A trained style encoder (stage 3, or stage 2 if stage 3 has not run) with its base."""

    config: ml_collections.ConfigDict
    model: models.StableDiffusion
    params: dict[str, Any]
    encoder: encoder_lib.StyleEncoder
    encoder_params: Any
    placeholder_id: int
    stage: int
    step: int


def load_style_run(workdir: str, stage: int | None = None) -> StyleRun:
    """The encoder of `<workdir>/stage<stage>` (newest of 3, 2 if None) and the frozen SD
    it was trained with (rebuilt from the saved config, placeholder token added)."""
    candidates = (stage,) if stage else (3, 2)
    for k in candidates:
        where = run_lib.stage_dir(workdir, k)
        if checkpoint.latest_step(where) is not None:
            break
    else:
        raise errors.NotFound(
            f"no trained style encoder in {workdir} (stage {' or '.join(map(str, candidates))}):"
            " run launch/train_style_encoder.py first"
        )
    config = checkpoint.load_run_config(where)
    model, params = runs.build_base(config)
    model, params, placeholder_id = splice.placeholder_token(
        model, params, config.style.placeholder
    )
    width = model.text_encoder.config.hidden_size
    encoder, initial = encoder_lib.build(config.style, width, jax.random.key(0))
    encoder_params, step = checkpoint.restore_trainable(where, checkpoint.abstract_like(initial))
    return StyleRun(config, model, params, encoder, encoder_params, placeholder_id, k, step)


def style_image_paths(path: str) -> list[str]:
    """A reference image, or the images of a folder (sorted)."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = sorted(
            os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES)
        )
        if found:
            return found
        raise errors.NotFound(f"--style_image folder {path!r} holds no {IMAGE_SUFFIXES} image")
    raise errors.NotFound(f"--style_image {path!r} does not exist")


def read_style_image(path: str, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: resized (shorter side) and centre-cropped, as training reads
    images; a file that is not an image is a `UserError` naming it."""
    try:
        with Image.open(path) as image:
            return resize_and_crop(image, size)
    except (OSError, ValueError) as e:
        raise errors.UserError(f"cannot read style image {path!r}: {e}") from e


def sample_to_dir(
    sample: ml_collections.ConfigDict,
    style_run: StyleRun,
    style_paths: Sequence[str],
    prompts: Sequence[str],
    out_dir: str,
    num_per_prompt: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> list[str]:
    """For every reference image and content prompt, `num_per_prompt` PNGs; writes
    `prompts.jsonl` (file, prompt, style image, seeds) and a labelled `grid.png`.

    Image seeds count up over (style, prompt, j) under `sample.seed`.
    """
    if not prompts or not style_paths:
        raise ValueError("sampling needs at least one prompt and one style image")
    config = style_run.config
    model = style_run.model
    settings = sampling.SamplerSettings.from_config(sample)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}), devices)
    size = sample.style_size or style_run.encoder.vision_config.image_size
    references = {p: read_style_image(p, size) for p in style_paths}
    jobs = [(p, prompt) for p in style_paths for prompt in prompts for _ in range(num_per_prompt)]
    template = config.style.prompt_template
    placeholder = config.style.placeholder
    styled_ids = model.tokenize([template.format(caption=c, style=placeholder) for _, c in jobs])
    text_ids = model.tokenize([c for _, c in jobs])
    uncond_ids = np.asarray(model.tokenize([sample.negative_prompt]), np.int32)
    pixels = to_pixels(np.stack([references[p] for p, _ in jobs]))
    generate = jax.jit(
        make_style_generate_fn(
            model, style_run.encoder, settings, sample.style_guidance, style_run.placeholder_id
        )
    )
    batch = sample.batch_per_device * mesh.devices.size
    weights = (
        {k: style_run.params[k] for k in ("unet", "vae", "text_encoder")},
        style_run.encoder_params,
    )
    replicated = jax.tree.map(lambda _: sharding.replicated(mesh), weights)
    params, encoder_params = sharding.place(weights, replicated)
    images = []
    for start in range(0, len(jobs), batch):
        rows = np.arange(start, start + batch) % len(jobs)  # The last batch repeats rows.
        seeds = rows.astype(np.uint32)
        local = (
            np.asarray(styled_ids, np.int32)[rows],
            np.asarray(text_ids, np.int32)[rows],
            pixels[rows],
            seeds,
        )
        s_ids, t_ids, px, sd = sharding.global_batch(mesh, local)
        out = generate(
            params, encoder_params, s_ids, t_ids, uncond_ids, px, sd, np.uint32(sample.seed)
        )
        count = min(batch, len(jobs) - start)
        images += list(sampling.to_uint8(np.asarray(out))[:count])
    images = [sampling.resize(image, sample.size) for image in images]
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    with open(os.path.join(out_dir, "prompts.jsonl"), "w") as f:
        for i, ((style_path, prompt), image) in enumerate(zip(jobs, images, strict=True)):
            path = os.path.join(out_dir, f"{i:05d}.png")
            Image.fromarray(image).save(path)
            paths.append(path)
            record = {
                "file": os.path.basename(path),
                "prompt": prompt,
                "style_image": style_path,
                "seed": sample.seed,
                "image_seed": i,
                "style_guidance": sample.style_guidance,
            }
            f.write(json.dumps(record) + "\n")
    labels = [f"{prompt} | {os.path.basename(p)}" for p, prompt in jobs]
    sampling.labelled_grid(images, labels).save(os.path.join(out_dir, "grid.png"))
    return paths


def export_run(workdir: str, output_dir: str, stage: int | None = None) -> dict[str, str]:
    """Writes the trained encoder of `workdir` (stage 3, else 2) for PyTorch users
    (`encoder.export_torch`); returns the paths written."""
    style_run = load_style_run(workdir, stage)
    return encoder_lib.export_torch(output_dir, style_run.encoder, style_run.encoder_params)
