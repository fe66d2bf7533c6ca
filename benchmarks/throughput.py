"""Training throughput of fine-tuning and NSYNC in nsync_jax, at real size: images/s, MFU.

The step exactly as training compiles it (`train.build_state` + `train.make_step_fn`: the
config's scope, optimizer, shardings, remat and attention), on a random-init published
architecture (`model.source = "random"`, `nsync_jax/architectures.py`; nothing
downloaded), bf16 compute with fp32 master weights, cached latents (random posterior
moments: `data.cache_latents` serves these, so no VAE runs in the step), the frozen CLIP
text encoder run every step on 77 random token ids, and the trainer's own loop
(`loop.run`, one fixed batch). The PyTorch reference is `benchmarks/throughput_torch.py`,
with the same flags.

Modes, with B images per branch per device:
  finetune      one forward/backward on the positive batch.
  nsync         g+ and g−, the projection, AdamW (2B images a step).
  nsync_every4  `nsync.negative_every = 4`: g− fresh on one step in four.

Reported per mode (and per attention/remat setting): step time p50/p90/mean, images/s
(both branches counted; for nsync_every4 the mean over a period), pairs/s, FLOPs per step
from the compiled step's `cost_analysis()`, MFU against `--peak_tflops`, and peak device
memory (`memory_stats()` where the backend has it, else the compiled step's
`memory_analysis()` estimate).

    python benchmarks/throughput.py --arch sd15 --resolution 512 --batch 8 \
        --attention xla,dot_product --output benchmarks/results/throughput_sd15.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence

# The repository root (configs/, nsync_jax/) when run as `python benchmarks/throughput.py`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from nsync_jax import architectures, cli, loop, runs, sharding, train  # noqa: E402

MODES = {"finetune": ("finetune", 1), "nsync": ("nsync", 1), "nsync_every4": ("nsync", 4)}
# Dense bf16 peak per chip, TFLOP/s, by device kind (vendor datasheets): the MFU denominator.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5p": 459.0}


def make_config(args: argparse.Namespace, mode: str, attention: str, remat: str):
    config = default.get_config()
    config.model.source = "random"
    config.model.architecture = args.arch
    config.model.resolution = args.resolution
    config.model.compute_dtype = args.compute_dtype
    config.model.param_dtype = "float32"
    config.model.attention = attention
    config.model.remat = remat
    config.train.mode, config.nsync.negative_every = MODES[mode]
    config.train.scope = args.scope
    config.train.batch_size = args.batch * len(devices(args))
    config.train.grad_accum = args.grad_accum
    config.optim.learning_rate = 1e-5
    config.mesh.data, config.mesh.fsdp = -1, args.fsdp
    return config


def devices(args: argparse.Namespace) -> list[jax.Device]:
    return jax.devices()[: args.devices] if args.devices else jax.devices()


def synthetic_batch(config, model, mesh, rng: np.random.Generator):
    """Cached-latent branches of the global batch: random posterior moments (NHWC, as
    `data/latents.py` serves them) and random token ids."""
    side = architectures.latent_side(config.model.architecture, config.model.resolution)
    channels = model.unet.config.in_channels
    n = config.train.batch_size

    def branch():
        return {
            "latent_mean": rng.standard_normal((n, side, side, channels)).astype(np.float32),
            "latent_std": np.full((n, side, side, channels), 0.1, np.float32),
            "input_ids": rng.integers(0, len(model.tokenizer), (n, 77)).astype(np.int32),
        }

    local = {"positive": branch()}
    if config.train.mode == "nsync":
        local["negative"] = branch()
    return sharding.global_batch(mesh, local)


def peak_tflops(device: jax.Device, flag: float | None) -> float | None:
    if flag:
        return flag
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def measure(args, mode: str, attention: str, remat: str) -> dict:
    config = make_config(args, mode, attention, remat)
    mesh = train.make_mesh(config, devices(args))
    model, params = runs.build_model(config.model, runs.run_keys(config.seed)[0])
    built = train.build_state(config, mesh, model, params)
    del params
    step_fn = train.make_step_fn(config, mesh, built)
    batch = synthetic_batch(config, built.model, mesh, np.random.default_rng(0))
    tick = time.perf_counter()
    compiled = step_fn.lower(built.state, batch).compile()
    compile_s = time.perf_counter() - tick
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    memory = compiled.memory_analysis()
    timer = loop.StepTimer()
    fixed = loop.FixedBatch(compiled, batch)
    state = loop.run(fixed, built.state, args.warmup, [timer])
    timer.seconds.clear()
    timer.restart()
    state = loop.run(fixed, state, args.warmup + args.steps, [timer])
    seconds = timer.seconds
    count = len(devices(args))
    mean = statistics.fmean(seconds)
    negative_every = MODES[mode][1]
    branches = 1 if config.train.mode == "finetune" else 1 + 1 / negative_every
    images_per_step = config.train.batch_size * branches
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    peak = (stats or {}).get("peak_bytes_in_use")
    peak_tf = peak_tflops(device, args.peak_tflops)
    # cost_analysis counts the whole program: with `negative_every > 1` both sides of the
    # cond, i.e. a fresh-g− step; the mean step does less.
    result = {
        "mode": mode,
        "attention": attention,
        "remat": remat,
        "compile_s": compile_s,
        "step_s": {
            "p50": statistics.median(seconds),
            "p90": float(np.percentile(seconds, 90)),
            "mean": mean,
        },
        "images_per_s": images_per_step / mean,
        "images_per_s_per_device": images_per_step / mean / count,
        "pairs_per_s": config.train.batch_size / mean if config.train.mode == "nsync" else None,
        "flops_per_step": flops,
        "flops_per_step_note": "fresh-g- step" if negative_every > 1 else "every step",
        "tflops_per_s_per_device": flops / mean / count / 1e12 if flops else None,
        "mfu": flops / mean / count / (peak_tf * 1e12) if flops and peak_tf else None,
        "peak_bytes_in_use": peak,
        "compiled_memory": {
            "argument_bytes": memory.argument_size_in_bytes,
            "output_bytes": memory.output_size_in_bytes,
            "alias_bytes": memory.alias_size_in_bytes,
            "temp_bytes": memory.temp_size_in_bytes,
        },
        "final_loss_pos": timer.metrics.get("loss_pos"),
    }
    del state, built, compiled, fixed
    return result


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15", choices=sorted(architectures.ARCHS))
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=8, help="images per branch per device")
    parser.add_argument("--modes", default="finetune,nsync,nsync_every4", help="comma list")
    parser.add_argument("--attention", default="xla", help="comma list of model.attention")
    parser.add_argument("--remat", default="none", help="comma list of model.remat")
    parser.add_argument("--scope", default="unet")
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--fsdp", type=int, default=1, help="mesh.fsdp (the rest is data)")
    parser.add_argument("--devices", type=int, default=0, help="use the first N; 0: all")
    parser.add_argument("--compute_dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first")
    parser.add_argument("--peak_tflops", type=float, default=None, help="default: by device")
    parser.add_argument("--output", default="benchmarks/results/throughput.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    cli.quiet_library_logs()
    rows = []
    for attention in args.attention.split(","):
        for remat in args.remat.split(","):
            for mode in args.modes.split(","):
                row = measure(args, mode, attention, remat)
                rows.append(row)
                pairs = row["pairs_per_s"]
                mfu = row["mfu"]
                print(
                    f"{mode:13s} attention={attention:11s} remat={remat:6s} "
                    f"step p50 {row['step_s']['p50'] * 1e3:8.1f} ms  "
                    f"{row['images_per_s']:8.2f} img/s  "
                    f"{'' if pairs is None else f'{pairs:7.2f} pairs/s  '}"
                    f"{'' if mfu is None else f'MFU {100 * mfu:5.1f}%  '}"
                    f"compile {row['compile_s']:.0f} s",
                    flush=True,
                )
    device = jax.devices()[0]
    result = {
        "settings": {**vars(args), "devices": len(devices(args))},
        "device": {
            "platform": device.platform,
            "kind": getattr(device, "device_kind", ""),
            "peak_tflops": peak_tflops(device, args.peak_tflops),
        },
        "versions": {
            "jax": jax.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"saved {args.output}")
    return result


if __name__ == "__main__":
    main()
