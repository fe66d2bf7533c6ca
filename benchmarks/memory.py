"""Memory and FLOPs of the real training step at real size, on CPU, with no weights.

Builds the SD 1.5 (or SD 2-base) architecture abstractly (`model.source = "random"`,
`models.build_random(abstract=True)`: shapes only, nothing allocated or downloaded), builds
the train state and the step exactly as training does (`train.build_state(abstract=True)`,
`train.make_step_fn`) on a fake 8-device CPU mesh, lowers and compiles it ahead of time
from `jax.ShapeDtypeStruct`s, and reads per device from the compiled program:
`memory_analysis()` (argument, output, alias, temporary bytes; peak = argument + output -
alias + temporary) and `cost_analysis()` (FLOPs per step). Latents are cached (the step
reads posterior moments; no VAE runs), compute is bf16, parameters fp32.

XLA's CPU compiler plans the buffers of the partitioned program the way it would on one
device of an accelerator, but it fuses and schedules for a CPU: read the figures as an
estimate of the accelerator's (good to tens of percent, docs/scale.md), not a guarantee.

    python benchmarks/memory.py --output benchmarks/results/memory_sd15.json
    python benchmarks/memory.py --grid full   # every combination (hours on 2 cores)
"""

from __future__ import annotations

import os
import sys

# Before JAX starts: 8 fake CPU devices for the mesh.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_NUM_CPU_DEVICES"] = os.environ.get("MEMORY_DEVICES", "8")
# Only buffer assignment and the cost model are read, never the machine code: skip LLVM's
# optimisation passes, which take most of a CPU compile of the SD UNet. And schedule for
# memory, as the GPU and TPU compilers do: XLA:CPU's default scheduler orders for
# concurrency and runs every rematerialised forward early, so remat would show its extra
# FLOPs but none of its savings (a 12-layer MLP: temp 0.88 GiB with and without
# jax.checkpoint under the default, 0.85 -> 0.45 GiB under this one).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
)
# The repository root (configs/, nsync_jax/) when run as `python benchmarks/memory.py`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import default  # noqa: E402
from nsync_jax import architectures, cli, models, runs, sharding, train  # noqa: E402

GiB = 1024**3
# name: (train.mode, nsync.negative_every, train.grad_accum). With accumulation the row's
# batch is per optimizer step: `nsync_accum4` at batch 4 runs 4 micro-batches of 1.
MODES = {
    "finetune": ("finetune", 1, 1),
    "nsync": ("nsync", 1, 1),
    "nsync_k4": ("nsync", 4, 1),
    "nsync_accum4": ("nsync", 1, 4),
}
BUDGETS_GIB = {"v5e (16 GiB)": 16, "v4 (32 GiB)": 32, "80 GiB": 80}
# (scope, mode, mesh, remat, batch per device): the rows the default run compiles.
CORE_GRID = [
    *[
        ("unet", "nsync", m, r, b)
        for m in ("fsdp8", "data8")
        for r in ("none", "blocks", "full")
        for b in (1, 4)
    ],
    ("unet", "finetune", "fsdp8", "none", 1),
    ("unet", "nsync_k4", "fsdp8", "none", 1),
    ("lora", "nsync", "fsdp8", "none", 1),
    ("lora", "nsync", "data8", "none", 1),
    ("textual_inversion", "nsync", "fsdp8", "none", 1),
    ("textual_inversion", "nsync", "data8", "none", 1),
]
FULL_GRID = list(
    itertools.product(
        ("unet", "lora", "textual_inversion"),
        ("finetune", "nsync", "nsync_k4"),
        ("data8", "fsdp8"),
        ("none", "blocks", "full"),
        (1, 4),
    )
)


def make_config(args, scope: str, mode: str, mesh: str, remat: str, batch: int):
    config = default.get_config()
    config.model.source = "random"
    config.model.architecture = args.arch
    config.model.resolution = args.resolution
    config.model.compute_dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat = remat
    config.model.attention = args.attention
    config.train.scope = scope
    config.train.mode, config.nsync.negative_every, config.train.grad_accum = MODES[mode]
    config.train.batch_size = batch * jax.device_count()
    config.lora.rank, config.lora.unet_targets = 8, "attention"
    config.data.cache_latents = True
    if mesh == "fsdp8":
        config.mesh.data, config.mesh.fsdp = 1, jax.device_count()
    else:
        config.mesh.data, config.mesh.fsdp = jax.device_count(), 1
    return config


def abstract_batch(config, model, mesh) -> dict:
    side = architectures.latent_side(config.model.architecture, config.model.resolution)
    channels = model.unet.config.in_channels
    n = config.train.batch_size
    batch_sharding = sharding.batch_sharding(mesh)

    def array(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)

    def branch():
        return {
            "latent_mean": array((n, side, side, channels), jnp.float32),
            "latent_std": array((n, side, side, channels), jnp.float32),
            "input_ids": array((n, 77), jnp.int32),
        }

    out = {"positive": branch()}
    if config.train.mode == "nsync":
        out["negative"] = branch()
    return out


def compile_row(args, scope, mode, mesh_name, remat, batch) -> dict:
    config = make_config(args, scope, mode, mesh_name, remat, batch)
    mesh = train.make_mesh(config)
    # The model carries its attention and remat options: built (abstractly) per row.
    model, params = models.build_random(config.model, runs.run_keys(config.seed)[0], abstract=True)
    built = train.build_state(config, mesh, model, params, abstract=True)
    step_fn = train.make_step_fn(config, mesh, built)
    tick = time.perf_counter()
    compiled = step_fn.lower(built.state, abstract_batch(config, built.model, mesh)).compile()
    seconds = time.perf_counter() - tick
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    trainable = sum(x.size for x in jax.tree.leaves(built.state.trainable))
    flops = float(cost.get("flops", 0.0)) / 1e12 if cost else None
    accum = config.train.grad_accum
    extra = {}
    if accum > 1 and flops is not None:
        # XLA's cost analysis counts a loop body once: the accumulation scan runs it
        # `accum` times. Scaled; the optimizer outside the scan is counted k times too
        # (negligible next to the UNet passes).
        extra = {"tflops_counted_by_xla": flops, "tflops_scaled_by_grad_accum": accum}
        flops *= accum
    return {
        "scope": scope,
        "mode": mode,
        "mesh": mesh_name,
        "remat": remat,
        "batch_per_device": batch,
        "trainable_params": int(trainable),
        "argument_gib": memory.argument_size_in_bytes / GiB,
        "output_gib": memory.output_size_in_bytes / GiB,
        "alias_gib": memory.alias_size_in_bytes / GiB,
        "temp_gib": memory.temp_size_in_bytes / GiB,
        "peak_gib": peak / GiB,
        "tflops_per_step_per_device": flops,
        "compile_s": seconds,
        "fits": {name: peak / GiB <= budget for name, budget in BUDGETS_GIB.items()},
        **extra,
    }


def unet_forward_tflops(args, model, params) -> float:
    """FLOPs of one UNet forward on one 64×64-latent image (batch 1, one device)."""
    side = architectures.latent_side(args.arch, args.resolution)
    context = jax.ShapeDtypeStruct((1, 77, model.unet.config.cross_attention_dim), jnp.bfloat16)
    latents = jax.ShapeDtypeStruct((1, model.unet.config.in_channels, side, side), jnp.bfloat16)
    timesteps = jax.ShapeDtypeStruct((1,), jnp.int32)
    lowered = jax.jit(model.predict_noise).lower(params["unet"], latents, timesteps, context)
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) / 1e12


def table(rows: list[dict]) -> str:
    head = (
        "| scope | mode | mesh | remat | batch/dev | args GiB | temp GiB | peak GiB | "
        "TFLOP/step/dev | fits 16 / 32 / 80 GiB |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        fits = " / ".join("yes" if v else "no" for v in r["fits"].values())
        lines.append(
            f"| {r['scope']} | {r['mode']} | {r['mesh']} | {r['remat']} | "
            f"{r['batch_per_device']} | {r['argument_gib']:.2f} | {r['temp_gib']:.2f} | "
            f"{r['peak_gib']:.2f} | {r['tflops_per_step_per_device']:.2f} | {fits} |"
        )
    return "\n".join(lines)


def _row_key(row: dict) -> tuple:
    return tuple(row[k] for k in ("scope", "mode", "mesh", "remat", "batch_per_device"))


def _previous_rows(args) -> list[dict]:
    """The rows of `args.output` when it was made with the same arch, resolution and
    attention (else an error: appending would mix unlike rows)."""
    if not os.path.exists(args.output):
        return []
    with open(args.output) as f:
        previous = json.load(f)
    for name in ("arch", "resolution", "attention"):
        if previous[name] != getattr(args, name):
            raise SystemExit(
                f"--append: {args.output} has {name}={previous[name]!r}, not "
                f"{getattr(args, name)!r}; choose another --output"
            )
    return previous["rows"]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15", choices=sorted(architectures.ARCHS))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--attention", default="xla")
    parser.add_argument("--grid", default="core", choices=("core", "full"))
    parser.add_argument(
        "--only", default="", help="rows to compile: 'scope,mode,mesh,remat,batch;...'"
    )
    parser.add_argument("--output", default="benchmarks/results/memory_sd15.json")
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the rows already in --output (same arch, resolution, attention); a "
        "row compiled again replaces its old figures",
    )
    args = parser.parse_args(argv)
    cli.quiet_library_logs()
    if args.only:
        grid = [
            (s, m, me, r, int(b))
            for s, m, me, r, b in (row.split(",") for row in args.only.split(";"))
        ]
    else:
        grid = CORE_GRID if args.grid == "core" else FULL_GRID
    config = make_config(args, "unet", "nsync", "fsdp8", "none", 1)
    base = models.build_random(config.model, runs.run_keys(config.seed)[0], abstract=True)
    forward = unet_forward_tflops(args, *base)
    print(f"UNet forward, one {args.resolution}px image: {forward:.3f} TFLOPs", flush=True)
    rows = _previous_rows(args) if args.append else []
    result = {
        "arch": args.arch,
        "resolution": args.resolution,
        "attention": args.attention,
        "devices": jax.device_count(),
        "unet_forward_tflops_per_image": forward,
        "rows": rows,
        "versions": {"jax": jax.__version__, "machine": platform.machine()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    for row in grid:
        new = compile_row(args, *row)
        rows[:] = [r for r in rows if _row_key(r) != _row_key(new)] + [new]
        with open(args.output, "w") as f:  # After every row: a long grid can be stopped.
            json.dump(result, f, indent=2)
        r = rows[-1]
        print(
            f"{r['scope']:18s} {r['mode']:8s} {r['mesh']} remat={r['remat']:6s} "
            f"b={r['batch_per_device']}  peak {r['peak_gib']:7.2f} GiB  "
            f"temp {r['temp_gib']:7.2f}  {r['tflops_per_step_per_device']:.2f} TFLOP  "
            f"(compiled in {r['compile_s']:.0f} s)",
            flush=True,
        )
    print(table(rows))
    print(f"saved {args.output}")
    return result


if __name__ == "__main__":
    main()
