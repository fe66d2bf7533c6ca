"""Step time of plain fine-tuning vs NSYNC on the tiny UNet, and the projection's share.

The steps are compiled once, then timed in alternating rounds (so machine noise hits them
alike); the figures are medians over rounds. Fine-tuning is timed at batch B (NSYNC's
`--batch_size` per branch) and at batch 2B, the same images per step as NSYNC's B
positives and B negatives: NSYNC's ratio to the first is its cost per optimizer step, its
ratio to the second (`nsync_over_finetune_2b`) the fair cost of the method, near 1 when
NSYNC costs little beyond its images (the projection, and two passes of B where
fine-tuning runs one of 2B). The projection's share is the time of the jitted projection
alone on gradient trees of the UNet's shapes, over the NSYNC step time.
With `--ema_decay`, the NSYNC step with an EMA of the weights (`train.ema_decay`) is
timed in the same rounds too, and the jitted EMA update alone on the UNet's parameters
(which, unlike the difference of two step times, is not lost in the machine's noise).

    python benchmarks/step_time.py --output benchmarks/results/step_time.json
    python benchmarks/step_time.py --ema_decay 0.9999 --output benchmarks/results/step_time_ema.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

# The repository root (configs/, nsync_jax/) when run as `python benchmarks/...`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo  # noqa: E402
from nsync_jax import cli, loop, projection, train  # noqa: E402
from nsync_jax import step as step_lib  # noqa: E402


def _time(fn, repeats: int) -> float:
    """Seconds per call, calls run back to back, each waited for."""
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / repeats


def _stepper(mode: str, scope: str, batch_size: int, ema_decay: float = 0.0):
    config = demo.get_config()
    config.train.mode, config.train.scope, config.train.batch_size = mode, scope, batch_size
    config.train.ema_decay = ema_decay
    trainer = train.setup(config, jax.devices()[:1])
    fixed = loop.FixedBatch(trainer.step_fn, trainer.batch(0))
    holder = {"state": trainer.state, "steps": 0}

    def run():  # One step of the trainer's own loop.
        holder["steps"] += 1
        holder["state"] = loop.run(fixed, holder["state"], holder["steps"])
        return holder["state"]

    jax.block_until_ready(run())  # Compile and warm up.
    jax.block_until_ready(run())
    return run, trainer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scope", default="unet", choices=["unet", "textual_inversion"])
    parser.add_argument("--batch_size", type=int, default=8, help="per branch")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--ema_decay", type=float, default=0.0, help="also time NSYNC + EMA")
    parser.add_argument("--output", default="benchmarks/results/step_time.json")
    args = parser.parse_args(argv)
    cli.quiet_library_logs()

    finetune, _ = _stepper("finetune", args.scope, args.batch_size)
    finetune_2b, _ = _stepper("finetune", args.scope, 2 * args.batch_size)
    nsync, trainer = _stepper("nsync", args.scope, args.batch_size)
    nsync_ema = None
    if args.ema_decay:
        nsync_ema, _ = _stepper("nsync", args.scope, args.batch_size, args.ema_decay)
    g = jax.tree.map(
        lambda x: np.random.default_rng(0).standard_normal(x.shape).astype(x.dtype),
        trainer.state.trainable,
    )
    g_neg = jax.tree.map(lambda x: x * 0.5 + 0.1, g)
    project = jax.jit(lambda p, n: projection.project(p, n)[0])
    jax.block_until_ready(project(g, g_neg))
    decay = step_lib.ema_decay_at(args.ema_decay, jax.numpy.int32(10**6))
    ema_update = jax.jit(lambda e, p: step_lib.ema_update(e, p, decay))
    jax.block_until_ready(ema_update(g_neg, g))

    times = {"finetune": [], "finetune_2b": [], "nsync": [], "projection": []}
    if nsync_ema is not None:
        times["nsync_ema"], times["ema_update"] = [], []
    for _ in range(args.rounds):
        times["finetune"].append(_time(finetune, args.steps))
        times["finetune_2b"].append(_time(finetune_2b, args.steps))
        times["nsync"].append(_time(nsync, args.steps))
        if nsync_ema is not None:
            times["nsync_ema"].append(_time(nsync_ema, args.steps))
            times["ema_update"].append(_time(lambda: ema_update(g_neg, g), args.steps * 4))
        times["projection"].append(_time(lambda: project(g, g_neg), args.steps * 4))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "finetune_step_s": med["finetune"],
        "nsync_step_s": med["nsync"],
        "ratio_nsync_over_finetune": med["nsync"] / med["finetune"],
        "finetune_2b_step_s": med["finetune_2b"],
        "nsync_over_finetune_2b": med["nsync"] / med["finetune_2b"],
        "projection_s": med["projection"],
        "projection_share_of_nsync_step": med["projection"] / med["nsync"],
        "rounds": times,
        "settings": {
            "config": "configs/demo.py",
            "scope": args.scope,
            "batch_size_per_branch": args.batch_size,
            "finetune_2b_batch_size": 2 * args.batch_size,
            "resolution": demo.get_config().model.resolution,
            "trainable_params": int(sum(x.size for x in jax.tree.leaves(g))),
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "ema_decay": args.ema_decay,
            "device": str(jax.devices()[0]),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "jax": jax.__version__,
        },
    }
    print(f"fine-tune step   {med['finetune'] * 1e3:8.1f} ms")
    print(f"NSYNC step       {med['nsync'] * 1e3:8.1f} ms")
    print(f"ratio            {result['ratio_nsync_over_finetune']:8.3f}  (target <= 2.05)")
    print(f"fine-tune at 2B  {med['finetune_2b'] * 1e3:8.1f} ms  (batch {2 * args.batch_size})")
    print(f"NSYNC / 2B       {result['nsync_over_finetune_2b']:8.3f}  (same images per step)")
    print(
        f"projection       {med['projection'] * 1e3:8.2f} ms = "
        f"{100 * result['projection_share_of_nsync_step']:.2f}% of the NSYNC step (target <= 2%)"
    )
    if nsync_ema is not None:
        result["nsync_ema_step_s"] = med["nsync_ema"]
        result["nsync_ema_over_nsync"] = med["nsync_ema"] / med["nsync"]
        result["ema_update_s"] = med["ema_update"]
        result["ema_update_share_of_nsync_step"] = med["ema_update"] / med["nsync"]
        print(
            f"NSYNC step + EMA {med['nsync_ema'] * 1e3:8.1f} ms = "
            f"{result['nsync_ema_over_nsync']:.3f} x the NSYNC step"
        )
        print(
            f"EMA update alone {med['ema_update'] * 1e3:8.2f} ms = "
            f"{100 * result['ema_update_share_of_nsync_step']:.2f}% of the NSYNC step"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"saved {args.output}")
    return result


if __name__ == "__main__":
    main()
