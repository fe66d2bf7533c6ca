"""Samplers of the reverse diffusion process as pure JAX functions.

DDIM, Euler, DPM-Solver++ (2M) and PNDM, each stepping as the diffusers scheduler of the
same role does (`DDIMScheduler`, `EulerDiscreteScheduler`, `DPMSolverMultistepScheduler`,
`PNDMScheduler` of diffusers 0.42, checked step by step in tests/test_samplers.py), and
configured from a model's `scheduler_config.json` with the same field names and, for
fields the config omits, the same defaults as that class.

Everything that depends only on the config and the number of steps (timesteps, noise
levels, per-step coefficients, which history terms each step combines) is computed once
in NumPy. What a sampler carries from one model call to the next is `SamplerState`, plain
arrays, so the whole loop runs inside `jax.lax.fori_loop`:

    sampler = make_sampler("dpm_solver", scheduler_config, num_steps=25)
    latents = noise * sampler.init_noise_sigma
    state = sampler.init_state(latents)

    def body(i, carry):
        latents, state = carry
        x = sampler.scale_model_input(state, latents, i)
        output = model(x, jnp.asarray(sampler.timesteps)[i])
        return sampler.step(state, output, i, latents)

    latents, _ = jax.lax.fori_loop(0, sampler.num_calls, body, (latents, state))

Steps compute in float32 and return latents in their input dtype. Config fields that
select behaviour we do not implement (Karras sigmas, thresholding, SDE variants, ...) are
rejected with a ValueError naming the field rather than silently ignored; fields of other
schedulers (e.g. PNDM's `skip_prk_steps` in a DDIM config) are ignored, as diffusers'
`from_config` ignores them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nsync_jax.models import schedules

Tables = dict[str, np.ndarray]


class SamplerState(NamedTuple):
    """What a sampler carries between model calls.

    Attributes:
      history: [H, *latents.shape] earlier model outputs, oldest first: PNDM's last three,
        DPM-Solver's last x̂0; H = 0 for DDIM and Euler.
      anchor: PNDM's x_t at the start of the step its Runge-Kutta stages (and its first
        PLMS correction) restart from; empty for the others.
      accum: PNDM's weighted sum of Runge-Kutta stage outputs; empty for the others.
    """

    history: jax.Array
    anchor: jax.Array
    accum: jax.Array


class Sampler(NamedTuple):
    """A sampler for one config and number of steps (see the module docstring for a loop).

    Attributes:
      timesteps: float32 [num_calls], the timestep of each model call, in call order (PNDM
        makes more calls than steps).
      init_noise_sigma: scale of the initial standard normal noise.
      init_state: `latents -> SamplerState` before the first call.
      scale_model_input: `(state, latents, i) -> model input` of call i.
      step: `(state, model_output, i, latents) -> (latents, state)` after call i.
    """

    timesteps: np.ndarray
    init_noise_sigma: float
    init_state: Callable[[jax.Array], SamplerState]
    scale_model_input: Callable[[SamplerState, jax.Array, jax.Array], jax.Array]
    step: Callable[[SamplerState, jax.Array, jax.Array, jax.Array], tuple[jax.Array, SamplerState]]

    @property
    def num_calls(self) -> int:
        """Model calls of a full run: the loop length."""
        return int(self.timesteps.shape[0])


def _options(
    name: str,
    config: Mapping[str, Any],
    fields: Mapping[str, Any],
    fixed: Mapping[str, Any],
) -> dict[str, Any]:
    """The sampler's `fields` from `config`, diffusers' defaults where it has none.

    `fixed` maps fields we implement at one value only (diffusers' default) to that value;
    a config that sets another raises.
    """
    for key, only in fixed.items():
        value = config.get(key, only)
        if value is None and only is False:
            continue  # diffusers types some flags `bool | None`; None is off.
        if value != only:
            raise ValueError(f"{name} sampler: {key}={value!r} is not supported (only {only!r})")
    return {key: config[key] if key in config else default for key, default in fields.items()}


def _train_timesteps(name: str, config: Mapping[str, Any], num_steps: int) -> int:
    steps = schedules.field(config, "num_train_timesteps")
    if not 1 <= num_steps <= steps:
        raise ValueError(f"{name} sampler: num_steps must be in [1, {steps}], got {num_steps}")
    return steps


def _spaced(spacing: str, train_steps: int, num_steps: int, offset: int) -> np.ndarray:
    """Descending integer timesteps of `timestep_spacing` (Lin et al. 2023, Table 2), as
    DDIM and PNDM space them: `leading` k·⌊T/n⌋ + offset, `trailing` round(T − k·T/n) − 1,
    `linspace` round(k·(T − 1)/(n − 1))."""
    if spacing == "leading":
        out = np.arange(num_steps)[::-1] * (train_steps // num_steps) + offset
    elif spacing == "trailing":
        out = np.round(np.arange(train_steps, 0, -train_steps / num_steps)) - 1
    elif spacing == "linspace":
        out = np.linspace(0, train_steps - 1, num_steps).round()[::-1]
    else:
        raise ValueError(f"timestep_spacing {spacing!r}: expected leading, trailing or linspace")
    out = out.astype(np.int64)
    if out.max() >= train_steps:
        raise ValueError(f"timestep {out.max()} past the schedule's {train_steps} (steps_offset?)")
    return out


def _at(tables: Tables, i: jax.Array) -> dict[str, jax.Array]:
    """Row i of each per-call table, as traced scalars."""
    return {key: jnp.asarray(value)[i] for key, value in tables.items()}


def _f32(values: Any) -> np.ndarray:
    return np.asarray(values, np.float32)


def _stateless(latents: jax.Array) -> SamplerState:
    empty = jnp.zeros((0,), jnp.float32)
    return SamplerState(jnp.zeros((0, *latents.shape), jnp.float32), empty, empty)


def _unscaled(state: SamplerState, latents: jax.Array, i: jax.Array) -> jax.Array:
    del state, i
    return latents


def _x0_and_eps(
    kind: str, output: jax.Array, sample: jax.Array, root_abar: jax.Array, root_noise: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """x̂0 and ε̂ from the model's output at x_t = √ᾱ·x0 + √(1−ᾱ)·ε (root_abar = √ᾱ,
    root_noise = √(1−ᾱ)); v = √ᾱ·ε − √(1−ᾱ)·x0."""
    if kind == "epsilon":
        return (sample - root_noise * output) / root_abar, output
    if kind == "v_prediction":
        return root_abar * sample - root_noise * output, root_abar * output + root_noise * sample
    return output, (sample - root_abar * output) / root_noise


def ddim(config: Mapping[str, Any], num_steps: int) -> Sampler:
    """Deterministic DDIM (Song et al. 2021, arXiv 2010.02502, eq. 12 with η = 0).

    From x̂0 and ε̂ at ᾱ_t: x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂, where prev = t − ⌊T/n⌋
    whatever the spacing, and ᾱ_prev of a negative prev is 1 (`set_alpha_to_one`) or ᾱ_0.
    With `clip_sample`, x̂0 is clipped to ±`clip_sample_range` (ε̂ is not recomputed).
    """
    opts = _options(
        "ddim",
        config,
        {
            "clip_sample": True,
            "clip_sample_range": 1.0,
            "set_alpha_to_one": True,
            "steps_offset": 0,
            "timestep_spacing": "leading",
        },
        {"thresholding": False},
    )
    kind = schedules.prediction_type(config)
    abar = schedules.alphas_cumprod(config)
    train_steps = _train_timesteps("ddim", config, num_steps)
    t = _spaced(opts["timestep_spacing"], train_steps, num_steps, opts["steps_offset"])
    prev = t - train_steps // num_steps
    final = 1.0 if opts["set_alpha_to_one"] else abar[0]
    abar_t = abar[t]
    abar_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
    tables = {
        "root_abar": _f32(np.sqrt(abar_t)),
        "root_noise": _f32(np.sqrt(1 - abar_t)),
        "root_abar_prev": _f32(np.sqrt(abar_prev)),
        "root_noise_prev": _f32(np.sqrt(1 - abar_prev)),
    }
    clip = float(opts["clip_sample_range"]) if opts["clip_sample"] else None

    def step(state, output, i, latents):
        c = _at(tables, i)
        x = latents.astype(jnp.float32)
        x0, eps = _x0_and_eps(kind, output.astype(jnp.float32), x, c["root_abar"], c["root_noise"])
        if clip is not None:
            x0 = jnp.clip(x0, -clip, clip)
        prev_sample = c["root_abar_prev"] * x0 + c["root_noise_prev"] * eps
        return prev_sample.astype(latents.dtype), state

    return Sampler(_f32(t), 1.0, _stateless, _unscaled, step)


def _karras_sigmas(abar: np.ndarray, config: Mapping[str, Any]) -> np.ndarray:
    """σ_t = √((1−ᾱ_t)/ᾱ_t), with ᾱ_{T−1} = 2⁻²⁴ instead of 0 under zero-SNR rescaling so
    that the first σ is finite (as Euler and DPM-Solver in diffusers)."""
    if schedules.field(config, "rescale_betas_zero_snr"):
        abar = abar.copy()
        abar[-1] = 2.0**-24
    return np.sqrt((1 - abar) / abar)


def _final_sigma(kind: str, train_sigmas: np.ndarray) -> float:
    if kind == "zero":
        return 0.0
    if kind == "sigma_min":
        return float(train_sigmas[0])
    raise ValueError(f"final_sigmas_type {kind!r}: expected 'zero' or 'sigma_min'")


def euler(config: Mapping[str, Any], num_steps: int) -> Sampler:
    """Euler's method on the probability-flow ODE in σ = √((1−ᾱ)/ᾱ) (Karras et al. 2022,
    arXiv 2206.00364, Algorithm 2 without churn), as `EulerDiscreteScheduler`.

    The state is x = x_t·√(1+σ²), starting at noise·σ_max (noise·√(1+σ_max²) with
    `leading` spacing, as diffusers); the model sees x/√(1+σ²). With x̂0 from its output,
    x_next = x + (x − x̂0)/σ · (σ_next − σ). σ between training steps is linear in t
    (Euler's default `linspace` timesteps are fractional); the last σ is 0 or σ_0
    (`final_sigmas_type`).
    """
    opts = _options(
        "euler",
        config,
        {"timestep_spacing": "linspace", "steps_offset": 0, "final_sigmas_type": "zero"},
        {
            "interpolation_type": "linear",
            "use_karras_sigmas": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
            "timestep_type": "discrete",
        },
    )
    kind = schedules.prediction_type(config)
    train_steps = _train_timesteps("euler", config, num_steps)
    spacing = opts["timestep_spacing"]
    if spacing == "linspace":  # Unrounded: Euler interpolates σ between training steps.
        t = np.linspace(0, train_steps - 1, num_steps)[::-1].astype(np.float32)
    else:
        t = _spaced(spacing, train_steps, num_steps, opts["steps_offset"]).astype(np.float32)
    train_sigmas = _karras_sigmas(schedules.alphas_cumprod(config), config)
    sigmas = np.interp(t, np.arange(train_steps), train_sigmas)
    sigmas = _f32(np.append(sigmas, _final_sigma(opts["final_sigmas_type"], train_sigmas)))
    sigma_max = float(sigmas.max())
    init_sigma = sigma_max if spacing in ("linspace", "trailing") else math.sqrt(sigma_max**2 + 1)
    sigma = sigmas[:-1]
    tables = {
        "sigma": sigma,
        "dt": sigmas[1:] - sigma,  # float32 differences of the float32 σ, as diffusers.
        "sigma_sq_1": _f32(sigma.astype(np.float64) ** 2 + 1),
        "root_sigma_sq_1": _f32(np.sqrt(sigma.astype(np.float64) ** 2 + 1)),
    }

    def scale_model_input(state, latents, i):
        del state
        return latents / jnp.asarray(tables["root_sigma_sq_1"])[i]

    def step(state, output, i, latents):
        c = _at(tables, i)
        x, out = latents.astype(jnp.float32), output.astype(jnp.float32)
        if kind == "epsilon":
            x0 = x - c["sigma"] * out
        elif kind == "v_prediction":
            x0 = out * (-c["sigma"] / c["root_sigma_sq_1"]) + x / c["sigma_sq_1"]
        else:
            x0 = out
        derivative = (x - x0) / c["sigma"]
        return (x + derivative * c["dt"]).astype(latents.dtype), state

    return Sampler(t, float(np.float32(init_sigma)), _stateless, scale_model_input, step)


def dpm_solver(config: Mapping[str, Any], num_steps: int) -> Sampler:
    """DPM-Solver++ multistep, order 2 ("2M") or 1 (Lu et al. 2022, arXiv 2211.01095).

    In λ = log(α_t/σ_t) = −log σ (σ = √((1−ᾱ)/ᾱ), α_t = 1/√(1+σ²), σ_t = σ·α_t), with x̂0
    the data prediction of step i and h = λ_{i+1} − λ_i:
      first order:  x_{i+1} = (σ_t,{i+1}/σ_t,i)·x_i + α_t,{i+1}(1 − e^{−h})·x̂0_i,
      second order: plus C·(x̂0_i − x̂0_{i−1}) with r = (λ_i − λ_{i−1})/h and
        C = α_t,{i+1}(1 − e^{−h})/(2r) (`solver_type` midpoint) or
        C = α_t,{i+1}((e^{−h} − 1)/h + 1)/r (heun).
    The first step is first order, and so is the last when the final σ is 0, or
    `euler_at_final`, or (`lower_order_final`) for fewer than 15 steps.
    """
    opts = _options(
        "dpm_solver",
        config,
        {
            "solver_order": 2,
            "algorithm_type": "dpmsolver++",
            "solver_type": "midpoint",
            "variance_type": None,
            "lower_order_final": True,
            "euler_at_final": False,
            "final_sigmas_type": "zero",
            "lambda_min_clipped": -math.inf,
            "timestep_spacing": "linspace",
            "steps_offset": 0,
        },
        {
            "thresholding": False,
            "use_karras_sigmas": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
            "use_lu_lambdas": False,
            "use_flow_sigmas": False,
            "use_dynamic_shifting": False,
        },
    )
    if opts["solver_order"] not in (1, 2):
        raise ValueError(f"dpm_solver sampler: solver_order {opts['solver_order']} not in (1, 2)")
    # Configs saved by DEIS or UniPC name their own algorithm and solver; diffusers reads
    # those as DPM-Solver++ with the midpoint solver.
    algorithm = "dpmsolver++" if opts["algorithm_type"] == "deis" else opts["algorithm_type"]
    if algorithm != "dpmsolver++":
        raise ValueError(f"dpm_solver sampler: algorithm_type {algorithm!r} is not supported")
    if opts["solver_type"] in ("logrho", "bh1", "bh2"):
        opts["solver_type"] = "midpoint"
    if opts["solver_type"] not in ("midpoint", "heun"):
        raise ValueError(f"dpm_solver sampler: solver_type {opts['solver_type']!r} not supported")
    if opts["variance_type"] in ("learned", "learned_range"):
        raise ValueError(
            f"dpm_solver sampler: variance_type {opts['variance_type']!r} not supported"
        )
    kind = schedules.prediction_type(config)
    train_steps = _train_timesteps("dpm_solver", config, num_steps)
    train_sigmas = _karras_sigmas(schedules.alphas_cumprod(config), config)
    # Steps whose λ falls below `lambda_min_clipped` are never visited (cosine schedules).
    last = train_steps - np.searchsorted(-np.log(train_sigmas)[::-1], opts["lambda_min_clipped"])
    spacing = opts["timestep_spacing"]
    if spacing == "linspace":
        t = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        t = np.arange(num_steps + 1)[::-1][:-1] * (last // (num_steps + 1)) + opts["steps_offset"]
    elif spacing == "trailing":
        t = np.round(np.arange(last, 0, -train_steps / num_steps)) - 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r}: expected leading, trailing or linspace")
    t = t.astype(np.int64)
    final = _final_sigma(opts["final_sigmas_type"], train_sigmas)
    sigmas = _f32(np.append(train_sigmas[t], final)).astype(np.float64)
    alpha = 1 / np.sqrt(sigmas**2 + 1)
    sigma_t = sigmas * alpha
    n = len(t)
    first_order = np.zeros(n, bool)
    first_order[0] = True
    first_order[-1] = (
        opts["euler_at_final"]
        or (opts["lower_order_final"] and n < 15)
        or opts["final_sigmas_type"] == "zero"
    )
    if opts["solver_order"] == 1:
        first_order[:] = True
    ratio = sigmas[1:] / sigmas[:-1]  # e^{−h}
    phi = alpha[1:] * (1 - ratio)  # α_{i+1}(1 − e^{−h})
    correction = np.zeros(n)
    for i in np.flatnonzero(~first_order):  # σ_{i+1} > 0 here, so h is finite.
        h = math.log(sigmas[i] / sigmas[i + 1])
        r = math.log(sigmas[i - 1] / sigmas[i]) / h
        if opts["solver_type"] == "midpoint":
            correction[i] = phi[i] / (2 * r)
        else:
            correction[i] = alpha[i + 1] * ((ratio[i] - 1) / h + 1) / r
    tables = {
        "alpha": _f32(alpha[:-1]),
        "sigma_t": _f32(sigma_t[:-1]),
        "keep": _f32(sigma_t[1:] / sigma_t[:-1]),
        "phi": _f32(phi),
        "correction": _f32(correction),
    }

    def init_state(latents):
        empty = jnp.zeros((0,), jnp.float32)
        return SamplerState(jnp.zeros((1, *latents.shape), jnp.float32), empty, empty)

    def step(state, output, i, latents):
        c = _at(tables, i)
        x, out = latents.astype(jnp.float32), output.astype(jnp.float32)
        x0, _ = _x0_and_eps(kind, out, x, c["alpha"], c["sigma_t"])
        prev_x0 = state.history[0]
        x_next = c["keep"] * x + c["phi"] * x0 + c["correction"] * (x0 - prev_x0)
        return x_next.astype(latents.dtype), state._replace(history=x0[None])

    return Sampler(_f32(t), 1.0, init_state, _unscaled, step)


# Adams-Bashforth weights of PLMS (Liu et al. 2022) on (the new output, the last three
# before it), by the number of outputs it has so far.
_PLMS_WEIGHTS = {
    1: (1.0, 0.0, 0.0, 0.0),
    2: (3 / 2, -1 / 2, 0.0, 0.0),
    3: (23 / 12, -16 / 12, 5 / 12, 0.0),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _pndm_calls(
    base: np.ndarray, train_steps: int, num_steps: int, skip_prk: bool
) -> tuple[np.ndarray, Tables]:
    """Timesteps of PNDM's model calls and, per call, how its step combines outputs.

    Follows `PNDMScheduler`'s counter: without `skip_prk_steps`, three Runge-Kutta steps
    of four calls each (at t, t − h twice and t − 2h, h = ⌊⌊T/n⌋/2⌋) warm up the history;
    with it, the first step is taken twice, the second time with the mean of both outputs.

    Args:
      base: ascending inference timesteps.
    """
    ratio, half = train_steps // num_steps, train_steps // num_steps // 2
    if skip_prk:
        prk = np.zeros(0, np.int64)
        plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
    else:
        stages = np.repeat(base[-4:], 2) + np.tile([0, half], 4)
        prk = np.repeat(stages[:-1], 2)[1:-1][::-1]
        plms = base[:-3][::-1]
    calls = np.concatenate([prk, plms]).astype(np.int64)
    rows = []
    outputs = 0  # Outputs in diffusers' `ets` list.
    for counter, t in enumerate(calls):
        row = dict(w_new=1.0, w_hist=(0.0, 0.0, 0.0), w_accum=0.0, keep=0.0, add=0.0)
        row.update(push=False, set_anchor=False, from_anchor=False)
        if counter < len(prk):
            stage = counter % 4
            row.update(t=prk[counter - stage], prev=t - (0 if counter % 2 else half))
            # Stages step from the anchor with their own output; the fourth steps with the
            # RK4 mean 1/6, 1/3, 1/3, 1/6 of the four, summed in `accum`.
            row.update(from_anchor=True, keep=float(stage in (1, 2)))
            row.update(add=(1 / 6, 1 / 3, 1 / 3, 0.0)[stage])
            if stage == 0:
                row.update(push=True, set_anchor=True)
                outputs += 1
            elif stage == 3:
                row.update(w_new=1 / 6, w_accum=1.0)
        elif counter == 1:  # skip_prk: the first step again, from its start.
            row.update(t=t + ratio, prev=t, w_new=0.5, w_hist=(0.0, 0.0, 0.5), from_anchor=True)
        else:
            outputs = min(outputs + 1, 4)
            w = _PLMS_WEIGHTS[outputs]
            row.update(t=t, prev=t - ratio, w_new=w[0], w_hist=w[:0:-1], push=True)
            row.update(set_anchor=counter == 0)
        rows.append(row)
    tables = {key: np.asarray([row[key] for row in rows]) for key in rows[0]}
    return calls, tables


def pndm(config: Mapping[str, Any], num_steps: int) -> Sampler:
    """Pseudo numerical methods (Liu et al. 2022, arXiv 2202.09778), as `PNDMScheduler`.

    Every call moves x from t to prev with the paper's transfer (a DDIM step in ε),
      x_prev = √(ᾱ_prev/ᾱ_t)·x − (ᾱ_prev − ᾱ_t)·ε / (ᾱ_t√(1−ᾱ_prev) + √(ᾱ_t(1−ᾱ_t)ᾱ_prev)),
    where ε combines model outputs: linear multistep (PLMS, Adams-Bashforth of order up to 4)
    once three earlier outputs exist, Runge-Kutta stages (PRK) before that unless
    `skip_prk_steps` (SD 1.x configs set it). v outputs are combined first, then turned
    into ε with the x they step from. PRK needs num_steps >= 4.
    """
    opts = _options(
        "pndm",
        config,
        {
            "skip_prk_steps": False,
            "set_alpha_to_one": False,
            "timestep_spacing": "leading",
            "steps_offset": 0,
        },
        {},
    )
    if schedules.field(config, "rescale_betas_zero_snr"):
        # diffusers' PNDMScheduler has no such field and would sample with another ᾱ
        # than the model trained with.
        raise ValueError("pndm sampler: rescale_betas_zero_snr is not supported")
    kind = schedules.prediction_type(config, ("epsilon", "v_prediction"))
    abar = schedules.alphas_cumprod(config)
    train_steps = _train_timesteps("pndm", config, num_steps)
    if not opts["skip_prk_steps"] and num_steps < 4:
        raise ValueError(
            f"pndm sampler: its Runge-Kutta warm-up needs num_steps >= 4, got {num_steps}"
        )
    base = _spaced(opts["timestep_spacing"], train_steps, num_steps, opts["steps_offset"])[::-1]
    calls, rows = _pndm_calls(base, train_steps, num_steps, opts["skip_prk_steps"])
    final = 1.0 if opts["set_alpha_to_one"] else abar[0]
    abar_t = abar[rows["t"]]
    abar_prev = np.where(rows["prev"] >= 0, abar[np.maximum(rows["prev"], 0)], final)
    denominator = abar_t * np.sqrt(1 - abar_prev) + np.sqrt(abar_t * (1 - abar_t) * abar_prev)
    tables = {
        "w_new": _f32(rows["w_new"]),
        "w_hist": _f32(rows["w_hist"]),
        "w_accum": _f32(rows["w_accum"]),
        "keep": _f32(rows["keep"]),
        "add": _f32(rows["add"]),
        "push": rows["push"],
        "set_anchor": rows["set_anchor"],
        "from_anchor": rows["from_anchor"],
        "root_abar": _f32(np.sqrt(abar_t)),
        "root_noise": _f32(np.sqrt(1 - abar_t)),
        "sample_coeff": _f32(np.sqrt(abar_prev / abar_t)),
        "eps_coeff": _f32((abar_prev - abar_t) / denominator),
    }

    def init_state(latents):
        zeros = jnp.zeros(latents.shape, jnp.float32)
        return SamplerState(jnp.zeros((3, *latents.shape), jnp.float32), zeros, zeros)

    def step(state, output, i, latents):
        c = _at(tables, i)
        x, out = latents.astype(jnp.float32), output.astype(jnp.float32)
        anchor = jnp.where(c["set_anchor"], x, state.anchor)
        start = jnp.where(c["from_anchor"], anchor, x)
        combined = (
            c["w_new"] * out
            + jnp.tensordot(c["w_hist"], state.history, axes=1)
            + c["w_accum"] * state.accum
        )
        if kind == "v_prediction":
            combined = c["root_abar"] * combined + c["root_noise"] * start
        prev_sample = c["sample_coeff"] * start - c["eps_coeff"] * combined
        history = jnp.where(
            c["push"], jnp.concatenate([state.history[1:], out[None]]), state.history
        )
        accum = c["keep"] * state.accum + c["add"] * out
        return prev_sample.astype(latents.dtype), SamplerState(history, anchor, accum)

    return Sampler(_f32(calls), 1.0, init_state, _unscaled, step)


SAMPLERS: dict[str, Callable[[Mapping[str, Any], int], Sampler]] = {
    "pndm": pndm,  # SD 1.5's default.
    "ddim": ddim,
    "euler": euler,
    "dpm_solver": dpm_solver,
}


def make_sampler(name: str, scheduler_config: Mapping[str, Any], num_steps: int) -> Sampler:
    """The sampler `name` (a key of `SAMPLERS`) for a model's scheduler config.

    Raises:
      ValueError: for an unknown name, a config field the sampler does not support, or a
        number of steps it cannot take.
    """
    if name not in SAMPLERS:
        raise ValueError(f"scheduler {name!r} is not one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](scheduler_config, num_steps)
