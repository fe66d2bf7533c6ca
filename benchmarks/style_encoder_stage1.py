"""Stage 1 of the style encoder on the digits testbed: does the inversion fit, and how far
is it from what the public code saves (the initial random vectors)?

Digits in the benchmark style (`data/digits.py`, "styled"), content captions ending in
", in the style of sks."; a tiny pixel-space SD (`model.tiny.identity_vae`) with random
weights (no pretraining: this measures the inversion's fit, not image quality). For each
seed, stage 1 runs through `style_encoder.run.setup` and the trainer's `loop.run`; an
`AtSteps` hook scores the rows of the batch in training on fixed draws (timesteps, noise:
`--draws` per image) at chosen steps into each batch's `steps_per_batch`. At the end
every image is scored with its trained vectors and with its initial vectors (the public
code's stale copy is those, so its saved file and its loss are the initial ones).

    python benchmarks/style_encoder_stage1.py --out benchmarks/results/style_encoder_stage1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import style_encoder  # noqa: E402
from nsync_jax import cli, loop  # noqa: E402
from nsync_jax.data.examples import to_pixels  # noqa: E402
from nsync_jax.style_encoder import run, splice, stages  # noqa: E402

CHECKPOINTS = (0, 5, 10, 25, 50, 100, 200)  # Steps into a batch's steps_per_batch.


def config_for(seed: int, count: int, steps_per_batch: int):
    config = style_encoder.get_config()
    config.seed = seed
    config.stage = 1
    config.model.source = "tiny"
    config.model.resolution = 8
    config.model.tiny.unet_channels = (32, 64)
    config.model.tiny.vae_channels = (32,)
    config.model.tiny.identity_vae = True
    config.model.tiny.max_length = 48  # The caption, 8 style rows, "." and EOS fit.
    config.data.source = "digits"
    config.data.digits_rendering = "styled"
    config.data.digits_count = count
    config.data.demo_seed = seed
    config.style.tower = "tiny"
    config.stage1.batch_size = 8
    config.stage1.steps_per_batch = steps_per_batch
    config.checkpoint.every = 0
    config.log.every = 50
    config.mesh.data = 1
    return config


def make_per_image_loss(model, sks: int, seed: int, draws: int):
    """Jitted `(params, rows [N, 8, D], pixels, input_ids) -> [N]`: each image's denoising
    loss with its style vectors spliced in, averaged over `draws` fixed noise draws of
    `seed` (the same draws for every call, so banks compare)."""
    diffusion_loss = stages.make_diffusion_loss(model)
    keys = jax.random.split(jax.random.key(1000 + seed), draws)

    @jax.jit
    def per_image_loss(params, rows, pixels, input_ids):
        def one(key):
            def image(row, px, ids, k):
                context = splice.encode_spliced(
                    model, params["text_encoder"], ids[None], row[None], sks
                )
                return diffusion_loss(params, px[None], context, k)

            image_keys = jax.random.split(key, rows.shape[0])
            return jax.vmap(image)(rows, pixels, input_ids, image_keys)

        return jnp.mean(jax.vmap(one)(keys), axis=0)

    return per_image_loss


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    """One seed's stage 1 with the scores of the module doc."""
    tick = time.perf_counter()
    config = config_for(seed, args.count, args.steps_per_batch)
    workdir = os.path.join(args.out, "runs", f"seed{seed}")
    stage = run.setup(config, workdir, devices=jax.devices()[:1])
    # The step donates the state, frozen parameters included: every score reads the
    # parameters of the state it is given, never those of the first one.
    model, sks = stage.model, stage.placeholder_id
    initial = np.asarray(stage.state.trainable["bank"])
    per_image_loss = make_per_image_loss(model, sks, seed, args.draws)

    def score(frozen, bank, index):
        examples = stage.batches.examples
        pixels = to_pixels(np.stack([examples.image(int(i)) for i in index]))
        ids = stage.batches.input_ids[index]
        return np.asarray(per_image_loss(frozen, jnp.asarray(bank[index]), pixels, ids))

    curve = {j: [] for j in CHECKPOINTS if j <= args.steps_per_batch}
    spb = args.steps_per_batch

    def at_step(step, state):
        start = (step - 1) // spb * spb  # The first step of the batch in training.
        index = stage.batches.rows(start)
        bank = np.asarray(state.trainable["bank"])
        curve[step - start].append(float(score(state.frozen, bank, index).mean()))

    steps = [c * spb + j for c in range(stage.batches.batches_per_pass) for j in curve if j > 0]
    for c in range(stage.batches.batches_per_pass):
        rows = stage.batches.rows(c * spb)
        curve[0].append(float(score(stage.state.frozen, initial, rows).mean()))
    state = loop.run(stage, stage.state, stage.num_steps, [loop.AtSteps(at_step, steps)])
    everyone = np.arange(len(stage.batches))
    trained = score(state.frozen, np.asarray(state.trainable["bank"]), everyone)
    untrained = score(state.frozen, initial, everyone)
    return {
        "curve": {str(j): float(np.mean(v)) for j, v in curve.items()},
        "final_trained": float(trained.mean()),
        "final_initial_vectors": float(untrained.mean()),
        "images_improved": int((trained < untrained).sum()),
        "images": len(everyone),
        "bank_change_rms": float(
            np.sqrt(np.mean((np.asarray(state.trainable["bank"]) - initial) ** 2))
        ),
        "seconds": time.perf_counter() - tick,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--count", type=int, default=32, help="Style images.")
    parser.add_argument("--steps_per_batch", type=int, default=200)
    parser.add_argument("--draws", type=int, default=16, help="Noise draws per image.")
    args = parser.parse_args()
    cli.quiet_library_logs()
    os.makedirs(args.out, exist_ok=True)
    results = {"seeds": {}, "args": vars(args), "machine": platform.platform()}
    for seed in range(args.seeds):
        results["seeds"][seed] = run_seed(seed, args)
        print(json.dumps({seed: results["seeds"][seed]}), flush=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
