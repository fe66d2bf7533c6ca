"""Forward diffusion for training: noise schedule, timesteps, noisy latents, targets, loss.

Follows DDPM as Stable Diffusion trains it: x_t = sqrt(ᾱ_t)·x_0 + sqrt(1−ᾱ_t)·ε with t
uniform in [0, T); the UNet predicts ε (`epsilon`) or v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x_0
(`v_prediction`, SD 2.x), as the scheduler config says. The loss is the MSE in fp32.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction")


class NoiseSchedule(NamedTuple):
    alphas_cumprod: jax.Array  # [T] float32
    prediction_type: str

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]


def make_schedule(scheduler_config: dict[str, Any]) -> NoiseSchedule:
    """ᾱ_t from a diffusers scheduler config (linear or scaled_linear betas)."""
    steps = scheduler_config["num_train_timesteps"]
    start, end = scheduler_config["beta_start"], scheduler_config["beta_end"]
    kind = scheduler_config.get("beta_schedule", "linear")
    if kind == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2
    elif kind == "linear":
        betas = np.linspace(start, end, steps, dtype=np.float64)
    else:
        raise ValueError(f"beta_schedule {kind!r} is not supported (linear, scaled_linear)")
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r}: expected {PREDICTION_TYPES}")
    alphas_cumprod = np.cumprod(1.0 - betas)
    return NoiseSchedule(jnp.asarray(alphas_cumprod, jnp.float32), prediction_type)


class NoisedBatch(NamedTuple):
    noisy: jax.Array
    timesteps: jax.Array
    target: jax.Array


def add_noise(
    schedule: NoiseSchedule, latents: jax.Array, noise: jax.Array, timesteps: jax.Array
) -> NoisedBatch:
    """Noisy latents at `timesteps` and the regression target for the schedule's type."""
    abar = schedule.alphas_cumprod[timesteps].astype(jnp.float32)
    abar = abar.reshape((-1,) + (1,) * (latents.ndim - 1))
    x0 = latents.astype(jnp.float32)
    noisy = jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise
    if schedule.prediction_type == "epsilon":
        target = noise
    else:
        target = jnp.sqrt(abar) * noise - jnp.sqrt(1.0 - abar) * x0
    return NoisedBatch(noisy.astype(latents.dtype), timesteps, target)


def sample_noise(
    schedule: NoiseSchedule, rng: jax.Array, shape: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """Gaussian noise of `shape` and uniform integer timesteps, one per example."""
    noise_rng, t_rng = jax.random.split(rng)
    noise = jax.random.normal(noise_rng, shape, jnp.float32)
    timesteps = jax.random.randint(t_rng, (shape[0],), 0, schedule.num_train_timesteps)
    return noise, timesteps


def mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))
