"""Step time with and without cached VAE latents, on the demo config, in one process.

Both trainers are set up (the cached one encodes every positive and negative once, both
flips), compiled and warmed up; then they take turns, `--rounds` rounds of `--steps`
steps each (order alternating per round), so background load on a shared machine hits
both alike. A timed step is end to end: host batch (decode, or moment lookup), transfer
and the jitted step. Prints the figures and writes them as JSON to `--out`.

    python benchmarks/latent_cache.py --out /tmp/latent_cache.json
    python benchmarks/latent_cache.py --scope textual_inversion --out /tmp/ti.json
    # SD's proportions (the VAE sees 8x the latent side): 64 px images, 8x8 latents.
    python benchmarks/latent_cache.py --scope textual_inversion --resolution 64 \
        --vae_channels 32,32,32,32 --out /tmp/sd_like.json
"""

import json
import os
import platform
import statistics
import sys
import time

import jax
from absl import app, flags

# The repository root (configs/, nsync_jax/) when run as `python benchmarks/...`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo  # noqa: E402
from nsync_jax import cli, loop, train  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per round and setting.")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "Rounds; each times both settings.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (compilation).")
_OUT = flags.DEFINE_string("out", "latent_cache.json", "Where to write the figures.")
_SCOPE = flags.DEFINE_string("scope", "unet", "train.scope of the runs.")
_RESOLUTION = flags.DEFINE_integer("resolution", 0, "model.resolution; 0 keeps the demo's.")
_VAE_CHANNELS = flags.DEFINE_list(
    "vae_channels", [], "model.tiny.vae_channels; 4 entries downsample 8x like SD's VAE."
)


def _config():
    config = demo.get_config()
    config.train.scope = _SCOPE.value
    if _RESOLUTION.value:
        config.model.resolution = _RESOLUTION.value
    if _VAE_CHANNELS.value:
        config.model.tiny.vae_channels = tuple(int(c) for c in _VAE_CHANNELS.value)
    return config


class _Run:
    def __init__(self, cache_latents: bool):
        config = _config()
        config.data.cache_latents = cache_latents
        self.cache_latents = cache_latents
        start = time.perf_counter()
        self.trainer = train.setup(config)
        self.setup_s = time.perf_counter() - start
        self.state = self.trainer.state
        self.next_step = 0
        self.step_s: list[float] = []
        self.timer = loop.StepTimer()

    def steps(self, count: int) -> float:
        """Seconds per step over `count` steps of the trainer's loop, batches included
        (what the latent cache saves is host and VAE work)."""
        start = time.perf_counter()
        self.next_step += count
        self.state = loop.run(self.trainer, self.state, self.next_step, [self.timer])
        return (time.perf_counter() - start) / count


def main(argv):
    del argv
    cli.quiet_library_logs()
    runs = [_Run(False), _Run(True)]
    for run in runs:
        run.steps(_WARMUP.value)
    for r in range(_ROUNDS.value):
        for run in runs if r % 2 == 0 else runs[::-1]:
            run.step_s.append(run.steps(_STEPS.value))
    config = _config()
    result = {
        "config": "configs/demo.py",
        "mode": config.train.mode,
        "scope": _SCOPE.value,
        "resolution": config.model.resolution,
        "vae_channels": list(config.model.tiny.vae_channels),
        "unet_channels": list(config.model.tiny.unet_channels),
        "batch_size_per_branch": config.train.batch_size,
        "rounds_x_steps": [_ROUNDS.value, _STEPS.value],
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "host": platform.processor() or platform.machine(),
        "runs": [
            {
                "cache_latents": run.cache_latents,
                "setup_s": round(run.setup_s, 2),
                "step_s_median": round(statistics.median(run.step_s), 4),
                "step_s_min": round(min(run.step_s), 4),
                "step_s_rounds": [round(s, 4) for s in run.step_s],
                "loss_pos_last": run.timer.metrics["loss_pos"],
            }
            for run in runs
        ],
    }
    medians = [run["step_s_median"] for run in result["runs"]]
    result["step_speedup_median"] = round(medians[0] / medians[1], 3)
    print(json.dumps(result, indent=2))
    with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
