"""Training throughput of fine-tuning and NSYNC in PyTorch diffusers: the reference numbers.

The step a PyTorch user would write for the algorithm nsync_jax runs, on random-init models
of a published architecture (`nsync_jax/architectures.py`): fp32 master weights, bf16
autocast, diffusers' default SDPA attention, a frozen CLIP text encoder run every step on
77 random token ids, cached latents (random N(0, 1)), DDPM noise (scaled_linear
0.00085-0.012, 1000 steps, epsilon target) and `torch.optim.AdamW` (lr 1e-5, weight decay
1e-2, fused on CUDA).

Modes, with B images per branch:
  finetune      one forward/backward on the positive batch (B images a step).
  nsync         backward on the positives gives g+, backward on the negatives g-; g+ loses
                its projection on g- (the paper rule, fp32, one flat dot; see
                `project_paper_`), then AdamW (2B images a step).
  nsync_every4  a fresh g- only at steps divisible by 4, the kept one in between (as
                nsync_jax's `nsync.negative_every = 4`).

Each step is timed to the end of its device work (`torch.cuda.synchronize()`). Reported per
mode: step time p50/p90/mean, images/s (both branches counted), pairs/s (B over the step
time, nsync modes), peak memory (`torch.cuda.max_memory_allocated`, reset per mode), FLOPs
of one extra step counted by `torch.utils.flop_counter.FlopCounterMode`, and MFU against
`--peak_tflops`. It imports only torch, diffusers, transformers and
`nsync_jax/architectures.py` (plain dicts), so it runs where JAX is not installed.

    python benchmarks/throughput_torch.py --arch sd15 --resolution 512 --batch 8 \
        --output benchmarks/results/throughput_torch_sd15.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence

import diffusers
import torch
import torch.nn.functional as F
import transformers
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

# The repository root (nsync_jax/) when run as `python benchmarks/throughput_torch.py`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsync_jax import architectures as sd_arch  # noqa: E402  Plain dicts: imports no JAX.

# Steps between fresh negative gradients; 0: no negative branch.
NEGATIVE_EVERY = {"finetune": 0, "nsync": 1, "nsync_every4": 4}
TOKENS = 77  # SD's text sequence length.
LEARNING_RATE = 1e-5
WEIGHT_DECAY = 1e-2
PROJECTION_EPS = 1e-12  # nsync_jax.projection's default.
# Dense bf16 tensor-core peak of an H100/H200 SXM, TFLOP/s: the MFU denominator on CUDA.
H100_BF16_TFLOPS = 989.0


def project_paper_(pos: torch.Tensor, neg: torch.Tensor, eps: float = PROJECTION_EPS):
    r"""In place, ``pos <- pos - (<pos, neg> / (||neg||^2 + eps)) neg``: NSYNC's paper rule.

    The same update as ``nsync_jax.projection.project(pos, neg, rule="paper")`` over flat
    gradients: float32 inner products, and a coefficient of 0 when ``neg`` is zero. Stays on
    the device (no host sync).

    Args:
      pos: flat float32 g+, overwritten with the projected gradient.
      neg: flat float32 g-, same shape.
      eps: added to ``||neg||^2``.

    Returns:
      The coefficient, a 0-dim float32 tensor.
    """
    if pos.dtype != torch.float32 or neg.dtype != torch.float32 or pos.shape != neg.shape:
        raise ValueError(
            f"need two float32 tensors of one shape, got {pos.dtype}{tuple(pos.shape)} "
            f"and {neg.dtype}{tuple(neg.shape)}"
        )
    pn = torch.dot(pos, neg)
    nn = torch.dot(neg, neg)
    coefficient = torch.where(nn > 0, pn / (nn + eps), torch.zeros_like(pn))
    pos.addcmul_(neg, -coefficient)
    return coefficient


class FlatGrads:
    """One float32 buffer for a gradient of every parameter, lent to them as their `.grad`.

    Backward accumulates in place into an existing `.grad`, so after `attach()` a backward
    pass writes its gradient into this buffer. Two of them hold g+ and g- without copies,
    and the projection is one dot over all parameters.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)
        self.flat = torch.zeros(
            sum(p.numel() for p in self.params), dtype=torch.float32, device=self.params[0].device
        )
        self.views = []
        offset = 0
        for p in self.params:
            self.views.append(self.flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self._checked = False

    def attach(self, zero: bool = True) -> None:
        """Makes the buffer the parameters' `.grad`; zeroed first unless `zero=False`."""
        if zero:
            self.flat.zero_()
        for p, view in zip(self.params, self.views, strict=True):
            p.grad = view

    def check_written(self) -> None:
        """Raises unless the last backward wrote into the buffer (checked once)."""
        if self._checked:
            return
        for p, view in zip(self.params, self.views, strict=True):
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                raise RuntimeError("backward replaced a lent .grad instead of accumulating")
        self._checked = True


class TorchStep:
    """One optimizer step of a mode, as a PyTorch user would write it.

    Call it as `step(model, fresh)`: `model` is the UNet or its `torch.compile` wrapper (one
    set of parameters), `fresh` whether the nsync modes compute a new g- this step. Returns
    the number of images run through the UNet.
    """

    def __init__(
        self,
        mode: str,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        latents: dict[str, torch.Tensor],
    ):
        self.negative_every = NEGATIVE_EVERY[mode]
        self.text_encoder = text_encoder
        self.latents = latents
        self.device = latents["positive"].device
        self.batch = latents["positive"].shape[0]
        params = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params,
            lr=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY,
            fused=self.device.type == "cuda",
        )
        if self.negative_every:
            self.g_pos, self.g_neg = FlatGrads(params), FlatGrads(params)
        self.scheduler = DDPMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",
        )

    def loss(self, model: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """The epsilon MSE on one branch; its text is encoded here, as nsync_jax's step does."""
        b, device = latents.shape[0], latents.device
        vocab = self.text_encoder.config.vocab_size
        input_ids = torch.randint(0, vocab, (b, TOKENS), device=device)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), device=device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            with torch.no_grad():
                context = self.text_encoder(input_ids).last_hidden_state
            prediction = model(noisy, timesteps, encoder_hidden_states=context).sample
        return F.mse_loss(prediction.float(), noise.float())

    def __call__(self, model: torch.nn.Module, fresh: bool) -> int:
        if not self.negative_every:
            self.optimizer.zero_grad(set_to_none=True)
            self.loss(model, self.latents["positive"]).backward()
            self.optimizer.step()
            return self.batch
        self.g_pos.attach()
        self.loss(model, self.latents["positive"]).backward()
        self.g_pos.check_written()
        if fresh:
            self.g_neg.attach()
            self.loss(model, self.latents["negative"]).backward()
            self.g_neg.check_written()
            self.g_pos.attach(zero=False)
        project_paper_(self.g_pos.flat, self.g_neg.flat)
        self.optimizer.step()
        return self.batch * (2 if fresh else 1)


def is_fresh(mode: str, step: int) -> bool:
    """Whether `mode` computes a fresh g- at `step` (counted from 0, warm-up included)."""
    every = NEGATIVE_EVERY[mode]
    return bool(every) and step % every == 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def _count_flops(step: TorchStep, unet: torch.nn.Module, fresh: bool) -> int:
    """FLOPs of one step (matmuls, convolutions, attention), counted on the eager UNet."""
    with FlopCounterMode(display=False) as counter:
        step(unet, fresh)
    return counter.get_total_flops()


def run_mode(
    mode: str, args: argparse.Namespace, text_encoder: CLIPTextModel, device: torch.device
) -> dict:
    """Builds a fresh UNet and optimizer for `mode`, warms up, times and counts FLOPs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(args.seed)
    side = sd_arch.latent_side(args.arch, args.resolution)
    with torch.device(device):
        unet = UNet2DConditionModel(**sd_arch.unet_config(args.arch))
        latents = {b: torch.randn(args.batch, 4, side, side) for b in ("positive", "negative")}
    unet.train()
    model = torch.compile(unet) if args.compile else unet
    step = TorchStep(mode, unet, text_encoder, latents)

    for i in range(args.warmup):
        step(model, is_fresh(mode, i))
    _sync(device)
    times, images, fresh_steps = [], 0, 0
    for i in range(args.warmup, args.warmup + args.steps):
        fresh = is_fresh(mode, i)
        start = time.perf_counter()
        images += step(model, fresh)
        _sync(device)
        times.append(time.perf_counter() - start)
        fresh_steps += fresh
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    flops = {"fresh" if step.negative_every else "step": _count_flops(step, unet, True)}
    if step.negative_every > 1:
        flops["reused"] = _count_flops(step, unet, False)
    if step.negative_every:
        timed_flops = fresh_steps * flops["fresh"] + (args.steps - fresh_steps) * flops.get(
            "reused", 0
        )
    else:
        timed_flops = args.steps * flops["step"]
    total = sum(times)
    achieved = timed_flops / total
    nsync = bool(step.negative_every)
    return {
        "mode": mode,
        "negative_every": step.negative_every,
        "step_s": {
            "p50": statistics.median(times),
            "p90": _percentile(times, 0.9),
            "mean": total / len(times),
        },
        "step_times_s": times,
        "images_per_step": images / args.steps,
        "images_per_s": images / total,
        "pairs_per_s": args.steps * args.batch / total if nsync else None,
        "peak_memory_gib": peak,
        "flops_per_step": flops,
        "flops_per_step_mean": timed_flops / args.steps,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (args.peak_tflops * 1e12) if args.peak_tflops else None,
    }


def _versions(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15", choices=sorted(sd_arch.ARCHS))
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=8, help="images per branch")
    parser.add_argument("--modes", default="finetune,nsync,nsync_every4", help="comma list")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps per mode first")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help=f"MFU denominator; default {H100_BF16_TFLOPS} (H100/H200 bf16 dense) on CUDA, "
        "none on CPU",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/throughput_torch.json")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in args.modes:
        if mode not in NEGATIVE_EVERY:
            parser.error(f"unknown mode {mode!r}; expected some of {sorted(NEGATIVE_EVERY)}")
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("need --batch >= 1, --steps >= 1 and --warmup >= 0")
    try:
        sd_arch.latent_side(args.arch, args.resolution)
    except ValueError as e:
        parser.error(str(e))
    if args.peak_tflops is None and torch.device(args.device).type == "cuda":
        args.peak_tflops = H100_BF16_TFLOPS
    return args


def _print_table(results: list[dict]) -> None:
    print(
        f"{'mode':<13} {'p50 ms':>9} {'p90 ms':>9} {'mean ms':>9} {'img/s':>9} "
        f"{'pairs/s':>9} {'peak GiB':>9} {'GFLOP/step':>11} {'MFU':>6}"
    )
    for r in results:
        s = r["step_s"]
        pairs = f"{r['pairs_per_s']:9.2f}" if r["pairs_per_s"] is not None else f"{'-':>9}"
        peak = f"{r['peak_memory_gib']:9.2f}" if r["peak_memory_gib"] is not None else f"{'-':>9}"
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else f"{'-':>6}"
        print(
            f"{r['mode']:<13} {s['p50'] * 1e3:9.1f} {s['p90'] * 1e3:9.1f} {s['mean'] * 1e3:9.1f} "
            f"{r['images_per_s']:9.2f} {pairs} {peak} {r['flops_per_step_mean'] / 1e9:11.1f} "
            f"{mfu}"
        )


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark for `argv` (default: the command line); returns what it saves."""
    args = _parse(argv)
    device = torch.device(args.device)
    # Quiet the "Flax classes are deprecated" notice and the like, not errors.
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**sd_arch.text_config(args.arch)))
    text_encoder.eval().requires_grad_(False)

    results = []
    for mode in args.modes:
        results.append(run_mode(mode, args, text_encoder, device))
        # Nothing of one mode (UNet, optimizer state, gradients, compiled graphs) may
        # count against the next one's memory.
        if args.compile:
            torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    with torch.device("meta"):  # Shapes only: the modes' UNets are gone.
        unet = UNet2DConditionModel(**sd_arch.unet_config(args.arch))
    unet_params = sum(p.numel() for p in unet.parameters())
    attention = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    result = {
        "modes": {r["mode"]: r for r in results},
        "settings": {
            "arch": args.arch,
            "resolution": args.resolution,
            "latent_side": sd_arch.latent_side(args.arch, args.resolution),
            "batch_per_branch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "compile": args.compile,
            "device": str(device),
            "seed": args.seed,
            "unet_params": unet_params,
            "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
            "text_attention": getattr(text_encoder.config, "_attn_implementation", None),
            "unet_attention": attention,
            "autocast": "bfloat16",
            "master_weights": "float32",
            "optimizer": {
                "name": "torch.optim.AdamW",
                "lr": LEARNING_RATE,
                "weight_decay": WEIGHT_DECAY,
                "fused": device.type == "cuda",
            },
            "projection": {"rule": "paper", "eps": PROJECTION_EPS, "dtype": "float32"},
            "peak_tflops": args.peak_tflops,
            "flop_counter": "torch.utils.flop_counter.FlopCounterMode on one extra step"
            + (
                "; CPU's fused attention kernel has no formula, so attention is not counted"
                if device.type == "cpu"
                else ""
            ),
        },
        "versions": _versions(device),
    }
    _print_table(results)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"saved {args.output}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
