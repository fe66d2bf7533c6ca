"""Forward diffusion for training: noise schedule, timesteps, noisy latents, targets, loss.

Follows DDPM as Stable Diffusion trains it: x_t = sqrt(ᾱ_t)·x_0 + sqrt(1−ᾱ_t)·ε with t
uniform in [0, T); the UNet predicts ε (`epsilon`) or v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x_0
(`v_prediction`, SD 2.x), as the scheduler config says. The loss is the MSE in fp32.

`LossOptions` (the `train` config group's `timestep_min/max`, `noise_offset`,
`min_snr_gamma`) change that recipe the way kohya's sd-scripts and diffusers' training
examples do: t uniform in [min, max) instead; ε + offset·N(0, 1) of shape [B, C, 1, 1]
(Guttenberg 2023, "Diffusion with offset noise"); the MSE of each example weighted by
min-SNR-γ (Hang et al. 2023, arXiv 2303.09556). All off, the recipe and its random draws
are exactly the plain one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from nsync_jax import errors
from nsync_jax.models import schedules

PREDICTION_TYPES = ("epsilon", "v_prediction")


class NoiseSchedule(NamedTuple):
    alphas_cumprod: jax.Array  # [T] float32
    prediction_type: str

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]


def make_schedule(scheduler_config: dict[str, Any]) -> NoiseSchedule:
    """ᾱ_t and the training target of a diffusers scheduler config.

    Any schedule of `schedules.betas` (linear, scaled_linear, squaredcos_cap_v2 or trained
    betas, with zero-terminal-SNR rescaling when the config asks); ᾱ is computed in
    float64 and stored in float32.

    Raises:
      ValueError: for an unsupported beta schedule, or a prediction type other than
        `PREDICTION_TYPES` (training has no x_0 target).
    """
    prediction_type = schedules.prediction_type(scheduler_config, PREDICTION_TYPES)
    alphas_cumprod = schedules.alphas_cumprod(scheduler_config)
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


def predict_x0(
    schedule: NoiseSchedule, noisy: jax.Array, timesteps: jax.Array, prediction: jax.Array
) -> jax.Array:
    """The model's estimate of the clean latents x̂0 from its output at `timesteps`, in fp32:
    (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t for ε prediction, √ᾱ_t·x_t − √(1−ᾱ_t)·v̂ for v prediction
    (both invert `add_noise` exactly when the prediction equals its target)."""
    abar = schedule.alphas_cumprod[timesteps].astype(jnp.float32)
    abar = abar.reshape((-1,) + (1,) * (noisy.ndim - 1))
    x_t, out = noisy.astype(jnp.float32), prediction.astype(jnp.float32)
    if schedule.prediction_type == "epsilon":
        return (x_t - jnp.sqrt(1.0 - abar) * out) / jnp.sqrt(abar)
    return jnp.sqrt(abar) * x_t - jnp.sqrt(1.0 - abar) * out


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """How training draws timesteps and noise and weights the loss (module docstring).

    Attributes:
      timestep_min: the smallest timestep drawn.
      timestep_max: one past the largest (t is uniform in [min, max), as `randint`
        and kohya's `--min_timestep/--max_timestep`); -1 for the schedule's T.
      noise_offset: scale of the per-example, per-channel offset added to the noise.
      min_snr_gamma: γ of min-SNR-γ weighting; 0 leaves the loss unweighted.
    """

    timestep_min: int = 0
    timestep_max: int = -1
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0

    def __post_init__(self):
        if self.timestep_min < 0:
            raise errors.ConfigError(f"train.timestep_min must be >= 0, got {self.timestep_min}")
        if self.timestep_max != -1 and self.timestep_max <= self.timestep_min:
            raise errors.ConfigError(
                f"train.timestep_max={self.timestep_max} must be -1 (the schedule's T) or "
                f"above train.timestep_min={self.timestep_min}"
            )
        for name in ("noise_offset", "min_snr_gamma"):
            if getattr(self, name) < 0:
                raise errors.ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, train_config: ml_collections.ConfigDict) -> LossOptions:
        """The options of the `train` config group."""
        return cls(
            timestep_min=train_config.timestep_min,
            timestep_max=train_config.timestep_max,
            noise_offset=train_config.noise_offset,
            min_snr_gamma=train_config.min_snr_gamma,
        )

    def timestep_range(self, schedule: NoiseSchedule) -> tuple[int, int]:
        """[low, high) of the timesteps drawn, checked against the schedule's T."""
        steps = schedule.num_train_timesteps
        high = steps if self.timestep_max == -1 else self.timestep_max
        if high > steps or self.timestep_min >= high:
            raise errors.ConfigError(
                f"train.timestep_min={self.timestep_min}, train.timestep_max="
                f"{self.timestep_max}: the model's noise schedule has {steps} timesteps "
                f"(0 <= min < max <= {steps})"
            )
        return self.timestep_min, high


PLAIN = LossOptions()  # Standard DDPM training: every option off.


def sample_noise(
    schedule: NoiseSchedule,
    rng: jax.Array,
    shape: tuple[int, ...],
    options: LossOptions = PLAIN,
) -> tuple[jax.Array, jax.Array]:
    """Gaussian noise of NCHW `shape` and uniform integer timesteps, one per example.

    With `options.noise_offset` > 0 the noise gains offset·z, z ~ N(0, 1) of shape
    [B, C, 1, 1] (one value per example and channel), drawn from a key folded out of
    `rng`, so the rest of the noise and the timesteps are those drawn without it.
    """
    noise_rng, t_rng = jax.random.split(rng)
    noise = jax.random.normal(noise_rng, shape, jnp.float32)
    low, high = options.timestep_range(schedule)
    timesteps = jax.random.randint(t_rng, (shape[0],), low, high)
    if options.noise_offset > 0:
        offset = jax.random.normal(jax.random.fold_in(rng, 1), (*shape[:2], 1, 1), jnp.float32)
        noise = noise + options.noise_offset * offset
    return noise, timesteps


def snr(schedule: NoiseSchedule, timesteps: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of each timestep, in fp32."""
    abar = schedule.alphas_cumprod[timesteps].astype(jnp.float32)
    return abar / (1.0 - abar)


def min_snr_weights(schedule: NoiseSchedule, timesteps: jax.Array, gamma: float) -> jax.Array:
    """Per-example loss weights of min-SNR-γ (Hang et al. 2023) for the schedule's target.

    The paper's weight min(SNR, γ) is for a loss on x_0; on the ε target it becomes
    min(SNR, γ)/SNR, on the v target min(SNR, γ)/(SNR + 1) (as kohya's sd-scripts and
    diffusers' `train_text_to_image.py` compute it).
    """
    ratio = snr(schedule, timesteps)
    clipped = jnp.minimum(ratio, gamma)
    if schedule.prediction_type == "epsilon":
        return clipped / ratio
    return clipped / (ratio + 1.0)


def mse(prediction: jax.Array, target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean squared error in fp32; with per-example `weights` [B], the mean over examples
    of each example's MSE times its weight."""
    squared = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    if weights is None:
        return jnp.mean(squared)
    per_example = jnp.mean(squared, axis=tuple(range(1, squared.ndim)))
    return jnp.mean(weights * per_example)
