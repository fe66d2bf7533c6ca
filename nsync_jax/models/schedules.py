"""Noise schedules of diffusers scheduler configs: β_t, ᾱ_t and what the model predicts.

A `scheduler_config.json` of a diffusers pipeline names the discrete forward process
q(x_t | x_0) = N(√ᾱ_t·x_0, (1 − ᾱ_t)·I), t = 0 … T − 1, through its betas:
ᾱ_t = ∏_{s≤t} (1 − β_s). The betas come from `beta_schedule`:

- `linear`: β evenly spaced from `beta_start` to `beta_end` (Ho et al. 2020);
- `scaled_linear`: √β evenly spaced instead (latent diffusion, Stable Diffusion);
- `squaredcos_cap_v2`: the cosine schedule of Nichol & Dhariwal 2021 (arXiv 2102.09672),
  ᾱ(τ) = cos²((τ + 0.008)/1.008 · π/2) on τ ∈ [0, 1], β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0.999);
- or explicit `trained_betas`;

then, with `rescale_betas_zero_snr`, shifted and scaled so that the last step is pure noise
(Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps Are Flawed",
arXiv 2305.08891, Algorithm 1): √ᾱ_t ← (√ᾱ_t − √ᾱ_{T−1})·√ᾱ_0/(√ᾱ_0 − √ᾱ_{T−1}).

Everything here is NumPy in float64 (diffusers computes the same in float32, which differs
from these values by about 1e-6 relative); callers cast to float32 where the values go on
device. Fields a config leaves out take the defaults that diffusers' schedulers share
(`DEFAULTS`), as `from_config` would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# What the network's output is: the noise ε, the velocity v = √ᾱ·ε − √(1−ᾱ)·x_0
# (Salimans & Ho 2022, arXiv 2202.00512), or x_0 itself.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# The constructor defaults of diffusers' DDPM, DDIM, PNDM, Euler and DPM-Solver schedulers
# for the fields of the noise schedule: a saved config omits fields left at these.
DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
}


def field(config: Mapping[str, Any], name: str) -> Any:
    """`config[name]`, or diffusers' default for a schedule field the config omits."""
    return config[name] if name in config else DEFAULTS[name]


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021), each capped at `max_beta`."""

    def abar(tau: np.ndarray) -> np.ndarray:
        return np.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = np.arange(num_train_timesteps, dtype=np.float64)
    ratio = abar((steps + 1) / num_train_timesteps) / abar(steps / num_train_timesteps)
    return np.minimum(1.0 - ratio, max_beta)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose ᾱ_{T−1} is 0 and ᾱ_0 unchanged, √ᾱ_t moved linearly in between
    (Lin et al. 2023, Algorithm 1). β_{T−1} becomes 1."""
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    abar = ((root - last) * (first / (first - last))) ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def betas(config: Mapping[str, Any]) -> np.ndarray:
    """β_t, float64 [T], of a diffusers scheduler config (module docstring).

    Raises:
      ValueError: for a `beta_schedule` outside `BETA_SCHEDULES`, or trained betas of
        another length than `num_train_timesteps`.
    """
    steps = field(config, "num_train_timesteps")
    trained = field(config, "trained_betas")
    kind = field(config, "beta_schedule")
    if trained is not None:
        out = np.asarray(trained, np.float64)
        if out.shape != (steps,):
            raise ValueError(f"trained_betas has shape {out.shape}, expected ({steps},)")
    elif kind == "linear":
        out = np.linspace(field(config, "beta_start"), field(config, "beta_end"), steps)
    elif kind == "scaled_linear":
        start, end = field(config, "beta_start"), field(config, "beta_end")
        out = np.linspace(start**0.5, end**0.5, steps) ** 2
    elif kind == "squaredcos_cap_v2":
        out = cosine_betas(steps)
    else:
        raise ValueError(f"beta_schedule {kind!r} is not supported {BETA_SCHEDULES}")
    if field(config, "rescale_betas_zero_snr"):
        out = rescale_zero_terminal_snr(out)
    return out


def alphas_cumprod(config: Mapping[str, Any]) -> np.ndarray:
    """ᾱ_t = ∏_{s≤t} (1 − β_s), float64 [T]; ᾱ_{T−1} = 0 under zero-terminal-SNR rescaling."""
    return np.cumprod(1.0 - betas(config))


def prediction_type(
    config: Mapping[str, Any], supported: tuple[str, ...] = PREDICTION_TYPES
) -> str:
    """The config's `prediction_type`, checked against `supported`.

    Raises:
      ValueError: for a type outside `supported`.
    """
    kind = field(config, "prediction_type")
    if kind not in supported:
        raise ValueError(f"prediction_type {kind!r} is not supported; expected one of {supported}")
    return kind
