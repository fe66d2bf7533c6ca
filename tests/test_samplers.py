"""Our samplers against diffusers' PyTorch schedulers, step by step, on a toy model.

The toy model is linear in its input and in t, one such function per text context, so
guidance has an unconditional and a conditional prediction to combine. Both sides start
from the same noise; every intermediate latent is compared.
"""

import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nsync_jax import sampling
from nsync_jax.models import samplers

# diffusers' schedulers call np.array(tensor, copy=False), which NumPy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# stable-diffusion-v1-5's scheduler/scheduler_config.json.
SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD2_V = {**SD15, "prediction_type": "v_prediction"}  # stable-diffusion-2's 768 px v model.
ZERO_SNR = {**SD2_V, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}

TORCH = {
    "pndm": diffusers.PNDMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "dpm_solver": diffusers.DPMSolverMultistepScheduler,
}
SHAPE = (2, 4, 8, 8)
_rng = np.random.default_rng(0)
NOISE = _rng.standard_normal(SHAPE).astype(np.float32)
# Context 0 (unconditional) and 1 (conditional): nearby functions, as a trained model's
# predictions are, so that guidance 7.5 keeps the outputs of order one.
W0, V0, DW, DV = _rng.standard_normal((4, *SHAPE[1:])).astype(np.float32)
W, V = np.stack([W0, W0 + 0.2 * DW]), np.stack([V0, V0 + 0.2 * DV])


def _toy(x, t, w, v):
    """The toy model's output on input x at timestep t (torch or jax, float32)."""
    return x * (0.8 + 0.1 * w) + (t / 1000) * 0.2 * v


def _guided(x, t, guidance, to_array):
    uncond = _toy(x, t, to_array(W[0]), to_array(V[0]))
    if guidance is None:
        return uncond
    return uncond + guidance * (_toy(x, t, to_array(W[1]), to_array(V[1])) - uncond)


def _reference(name, config, num_steps, guidance, noise=NOISE):
    """Timesteps and the latents after each step of diffusers' scheduler, as its pipeline
    runs it."""
    scheduler = TORCH[name].from_config(config)
    scheduler.set_timesteps(num_steps)
    latents = torch.from_numpy(np.array(noise)) * scheduler.init_noise_sigma
    trajectory = [latents.numpy()]
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        time = torch.tensor(float(t), dtype=torch.float32)
        output = _guided(model_input, time, guidance, torch.from_numpy)
        latents = scheduler.step(output, t, latents).prev_sample
        trajectory.append(latents.numpy())
    return scheduler.timesteps.numpy(), np.stack(trajectory)


def _ours(sampler, guidance):
    """The latents before and after each call of our sampler, in one jitted `lax.scan`."""

    @jax.jit
    def run(noise):
        latents = noise * sampler.init_noise_sigma

        def body(carry, i):
            latents, state = carry
            model_input = sampler.scale_model_input(state, latents, i)
            output = _guided(model_input, jnp.asarray(sampler.timesteps)[i], guidance, jnp.asarray)
            latents, state = sampler.step(state, output, i, latents)
            return (latents, state), latents

        carry = (latents, sampler.init_state(latents))
        _, trajectory = jax.lax.scan(body, carry, jnp.arange(sampler.num_calls))
        return jnp.concatenate([latents[None], trajectory])

    return np.asarray(run(NOISE))


def _check(name, config, num_steps, guidance, atol_scale=1e-5):
    timesteps, ref = _reference(name, config, num_steps, guidance)
    sampler = samplers.make_sampler(name, config, num_steps)
    assert sampler.timesteps.dtype == np.float32
    np.testing.assert_array_equal(sampler.timesteps, timesteps.astype(np.float32))
    ours = _ours(sampler, guidance)
    for i in range(len(ref)):
        # Absolute tolerance relative to each step's scale, since latents cross zero. Our
        # ᾱ (float64, then float32) and per-step coefficients differ from diffusers' float32
        # ones in the last bits: the trajectories agree to ≤ 3.5e-6 of the scale.
        atol = atol_scale * np.abs(ref[i]).max()
        np.testing.assert_allclose(ours[i], ref[i], rtol=1e-5, atol=atol, err_msg=f"call {i}")


@pytest.mark.parametrize("guidance", [None, 7.5], ids=["unguided", "guided"])
@pytest.mark.parametrize("config", [SD15, SD2_V], ids=["sd15_eps", "sd2_v"])
@pytest.mark.parametrize("name", sampling.SCHEDULERS)
def test_five_steps_match_diffusers(name, config, guidance):
    _check(name, config, 5, guidance)


@pytest.mark.parametrize(
    "name, config, num_steps",
    [
        ("pndm", {**SD15, "skip_prk_steps": False}, 5),  # PRK warm-up: 14 calls.
        ("pndm", {**SD2_V, "skip_prk_steps": False, "timestep_spacing": "trailing"}, 6),
        ("pndm", {**SD2_V, "timestep_spacing": "linspace"}, 7),
        ("ddim", {"num_train_timesteps": 1000}, 5),  # Defaults: clip_sample, set_alpha_to_one.
        ("ddim", ZERO_SNR, 5),
        ("ddim", {**SD15, "prediction_type": "sample"}, 5),
        ("euler", {**SD15, "prediction_type": "sample"}, 5),
        ("dpm_solver", {**SD15, "prediction_type": "sample"}, 5),
        ("euler", {**SD15, "timestep_spacing": "leading"}, 5),
        ("euler", {**SD2_V, "final_sigmas_type": "sigma_min"}, 5),
        ("dpm_solver", {**SD15, "solver_type": "heun", "lower_order_final": False}, 5),
        ("dpm_solver", {**SD15, "timestep_spacing": "leading"}, 16),
        ("dpm_solver", {**SD2_V, "final_sigmas_type": "sigma_min"}, 16),  # Last step 2nd order.
        ("dpm_solver", ZERO_SNR, 5),
        (
            "dpm_solver",
            {**SD2_V, "beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
            5,
        ),
    ],
)
def test_config_variants_match_diffusers(name, config, num_steps):
    _check(name, config, num_steps, guidance=7.5)


def test_euler_from_zero_terminal_snr_matches_diffusers():
    """Zero terminal SNR puts Euler's first σ at 4096 (ᾱ_T = 2⁻²⁴): its first step cancels
    latents of ~1e4 down to ~10, so both float32 results carry ~2e-5 of their scale in
    rounding, and later steps carry it along."""
    _check("euler", ZERO_SNR, 5, guidance=7.5, atol_scale=5e-5)


def test_pndm_warm_up_makes_extra_calls():
    prk = samplers.make_sampler("pndm", {**SD15, "skip_prk_steps": False}, 5)
    plms = samplers.make_sampler("pndm", SD15, 5)
    assert (prk.num_calls, plms.num_calls) == (14, 6)  # 3 Runge-Kutta steps of 4 calls, 2 PLMS.


@pytest.mark.parametrize(
    "name, config, num_steps, match",
    [
        ("lms", SD15, 5, "scheduler 'lms'"),
        ("euler", {**SD15, "use_karras_sigmas": True}, 5, "use_karras_sigmas"),
        ("ddim", {**SD15, "thresholding": True}, 5, "thresholding"),
        ("dpm_solver", {**SD15, "algorithm_type": "sde-dpmsolver++"}, 5, "algorithm_type"),
        ("dpm_solver", {**SD15, "solver_order": 3}, 5, "solver_order"),
        ("pndm", {**SD15, "skip_prk_steps": False}, 3, "num_steps >= 4"),
        ("pndm", ZERO_SNR, 5, "rescale_betas_zero_snr"),
        ("pndm", {**SD15, "prediction_type": "sample"}, 5, "prediction_type"),
        ("ddim", SD15, 1001, "num_steps"),
    ],
)
def test_unsupported_settings_are_refused(name, config, num_steps, match):
    with pytest.raises(ValueError, match=match):
        samplers.make_sampler(name, config, num_steps)


class _ToyModel:
    """What `make_denoise_fn` uses of a `StableDiffusion`: the toy model, its context a
    constant per row (0 unconditional, 1 conditional), and an identity-like decoder."""

    latent_shape = SHAPE[1:]
    unet = vae = types.SimpleNamespace(dtype=jnp.float32)

    def __init__(self, scheduler_config):
        self.scheduler_config = scheduler_config

    def predict_noise(self, params, x, t, context):
        conditional = context[:, :1, :1, None] > 0.5  # [rows, 1, 1, 1]
        w = jnp.where(conditional, params["w"][1], params["w"][0])
        v = jnp.where(conditional, params["v"][1], params["v"][0])
        return _toy(x, t[:, None, None, None], w, v)

    def decode_latents(self, params, latents):
        del params
        return latents[:, :3] * 0.02


@pytest.mark.parametrize(
    "name, config",
    # The two with most to carry: PNDM's state through 14 calls, Euler's input scaling.
    [("pndm", {**SD15, "skip_prk_steps": False}), ("euler", SD2_V)],
)
def test_denoise_loop_matches_diffusers(name, config):
    """sampling.make_denoise_fn's jitted fori_loop with guidance 7.5, against the reference
    on the same initial noise."""
    model = _ToyModel(config)
    settings = sampling.SamplerSettings(name, 5, 7.5, "")
    denoise = sampling.make_denoise_fn(model, settings)
    params = {"unet": {"w": W, "v": V}, "vae": {}}
    image_seeds = jnp.asarray([3, 8], jnp.uint32)
    contexts = jnp.broadcast_to(jnp.asarray([0.0, 1.0])[None, :, None, None], (2, 2, 3, 5))
    generate = jax.jit(
        lambda params, contexts, image_seeds, seed: denoise(
            params, contexts, sampling.classifier_free(7.5), image_seeds, seed
        )
    )
    images = np.asarray(generate(params, contexts, image_seeds, np.uint32(4)))
    noise = np.asarray(sampling.initial_noise(np.uint32(4), image_seeds, model.latent_shape))
    _, ref = _reference(name, config, 5, 7.5, noise)
    pixels = np.transpose(ref[-1][:, :3] * 0.02, (0, 2, 3, 1)) / 2 + 0.5
    assert 0 < pixels.min() and pixels.max() < 1  # Unclipped: the comparison sees every value.
    np.testing.assert_allclose(images, pixels, rtol=1e-5, atol=1e-6)
