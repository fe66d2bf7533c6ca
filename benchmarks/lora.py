"""LoRA (merge and intercept) vs the full UNet, fine-tuning and NSYNC: step time and memory.

Every variant is the real training step (`train.setup` on one device: the demo's tiny
model, batch 8 per branch, 32 px), compiled once; its memory is what XLA's
`memory_analysis()` of the compiled step reports (temporaries, and the peak estimate
arguments + outputs - donated aliases + temporaries), its state what the parameters and
optimizer state hold. Step times are medians over rounds that alternate the variants,
so machine noise hits all alike.

    python benchmarks/lora.py --output benchmarks/results/lora.json
    python benchmarks/lora.py --unet_targets attention,proj,ff,resnet --rank 32
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

# The repository root (configs/, nsync_jax/) when run as `python benchmarks/...`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo  # noqa: E402
from nsync_jax import cli, loop, train  # noqa: E402

MiB = 2**20


def _bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _variant(mode: str, scope: str, implementation: str, args: argparse.Namespace):
    config = demo.get_config()
    config.train.mode, config.train.scope = mode, scope
    config.train.batch_size = args.batch_size
    config.lora.rank, config.lora.alpha = args.rank, float(args.rank)
    config.lora.unet_targets = args.unet_targets
    config.lora.implementation = implementation
    config.lora.base_dtype = args.base_dtype
    trainer = train.setup(config, jax.devices()[:1])
    batch = trainer.batch(0)
    memory = trainer.step_fn.lower(trainer.state, batch).compile().memory_analysis()
    fixed = loop.FixedBatch(trainer.step_fn, batch)
    holder = {"state": trainer.state, "steps": 0}

    def run():  # One step of the trainer's own loop.
        holder["steps"] += 1
        holder["state"] = loop.run(fixed, holder["state"], holder["steps"])
        return holder["state"]

    jax.block_until_ready(run())  # Warm up.
    state = holder["state"]
    info = {
        "trainable_params": int(sum(x.size for x in jax.tree.leaves(state.trainable))),
        "trainable_mib": _bytes(state.trainable) / MiB,
        "optimizer_state_mib": _bytes(state.opt_state) / MiB,
        "frozen_mib": _bytes(state.frozen) / MiB,
        "temp_mib": memory.temp_size_in_bytes / MiB,
        "peak_estimate_mib": (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes
        )
        / MiB,
    }
    return run, info


def _time(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=8, help="per branch")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--unet_targets", default="attention")
    parser.add_argument("--base_dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--output", default="benchmarks/results/lora.json")
    args = parser.parse_args()
    cli.quiet_library_logs()

    variants = {}
    for mode in ("finetune", "nsync"):
        variants[f"unet/{mode}"] = ("unet", "merge", mode)
        for implementation in ("merge", "intercept"):
            variants[f"lora-{implementation}/{mode}"] = ("lora", implementation, mode)
    runs, results = {}, {}
    for name, (scope, implementation, mode) in variants.items():
        runs[name], results[name] = _variant(mode, scope, implementation, args)
        print(f"compiled {name}", flush=True)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(_time(run, args.steps))
    for name in variants:
        results[name]["step_ms"] = 1e3 * statistics.median(times[name])
        results[name]["rounds_s"] = times[name]

    header = f"{'variant':24} {'step ms':>8} {'temp MiB':>9} {'peak MiB':>9} "
    header += f"{'trainable':>10} {'opt MiB':>8} {'frozen MiB':>10}"
    print(header)
    for name, r in results.items():
        print(
            f"{name:24} {r['step_ms']:8.1f} {r['temp_mib']:9.1f} {r['peak_estimate_mib']:9.1f} "
            f"{r['trainable_params']:10d} {r['optimizer_state_mib']:8.2f} {r['frozen_mib']:10.1f}"
        )
    output = {
        "results": results,
        "settings": {
            "config": "configs/demo.py",
            "batch_size_per_branch": args.batch_size,
            "resolution": demo.get_config().model.resolution,
            "rank": args.rank,
            "unet_targets": args.unet_targets,
            "base_dtype": args.base_dtype,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "device": str(jax.devices()[0]),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "jax": jax.__version__,
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(output, f, indent=2)
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
