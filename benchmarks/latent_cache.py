"""Step time with and without cached VAE latents, on the demo config, in one process.

For each setting the trainer is set up (the cached run encodes every positive and
negative once, both flips), the step compiled and warmed up, then `--steps` steps timed
end to end: host batch (decode or moment lookup), transfer and the jitted step. Prints
the figures and writes them as JSON to `--out`.

    python benchmarks/latent_cache.py --out /tmp/latent_cache.json
"""

import json
import platform
import time

import jax
from absl import app, flags

from configs import demo
from nsync_jax import sharding, train

_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per setting.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation).")
_OUT = flags.DEFINE_string("out", "latent_cache.json", "Where to write the figures.")
_SCOPE = flags.DEFINE_string("scope", "unet", "train.scope of the runs.")


def _time(cache_latents: bool) -> dict:
    config = demo.get_config()
    config.train.scope = _SCOPE.value
    config.data.cache_latents = cache_latents
    start = time.perf_counter()
    trainer = train.setup(config)
    setup_s = time.perf_counter() - start
    state = trainer.state

    def run(first: int, count: int):
        nonlocal state
        for step in range(first, first + count):
            batch = sharding.global_batch(trainer.mesh, trainer.batches.batch(step))
            state, metrics = trainer.step_fn(state, batch, trainer.step_rng)
        jax.block_until_ready((state, metrics))
        return metrics

    run(0, _WARMUP.value)
    start = time.perf_counter()
    metrics = run(_WARMUP.value, _STEPS.value)
    seconds = (time.perf_counter() - start) / _STEPS.value
    return {
        "cache_latents": cache_latents,
        "setup_s": round(setup_s, 3),
        "step_s": round(seconds, 5),
        "loss_pos_last": float(metrics["loss_pos"]),
    }


def main(argv):
    del argv
    config = demo.get_config()
    runs = [_time(False), _time(True)]
    result = {
        "config": "configs/demo.py",
        "mode": config.train.mode,
        "scope": _SCOPE.value,
        "resolution": config.model.resolution,
        "batch_size_per_branch": config.train.batch_size,
        "timed_steps": _STEPS.value,
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "host": platform.processor() or platform.machine(),
        "runs": runs,
        "step_speedup": round(runs[0]["step_s"] / runs[1]["step_s"], 3),
    }
    print(json.dumps(result, indent=2))
    with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
