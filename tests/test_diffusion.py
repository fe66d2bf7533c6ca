import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nsync_jax import diffusion, errors

CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

SCHEDULES = [
    {**CONFIG, "beta_schedule": "linear"},
    CONFIG,
    {**CONFIG, "beta_schedule": "squaredcos_cap_v2"},
    {"num_train_timesteps": 1000},  # diffusers' defaults: linear from 1e-4 to 0.02.
    {"num_train_timesteps": 50, "trained_betas": np.linspace(1e-3, 0.2, 50).tolist()},
]
SCHEDULE_IDS = ["linear", "scaled_linear", "cosine", "defaults", "trained"]


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("config", SCHEDULES, ids=SCHEDULE_IDS)
def test_alphas_cumprod_match_diffusers(config, rescale):
    config = {**config, "rescale_betas_zero_snr": rescale}
    ours = np.asarray(diffusion.make_schedule(config).alphas_cumprod)
    ref = diffusers.DDPMScheduler(**config).alphas_cumprod.numpy()
    # diffusers computes the betas in float32, we in float64: ≤ 1.4e-6 apart relative where
    # ᾱ > 1e-3. Where rescaling takes ᾱ towards 0 its float32 rounding is larger relative
    # to ᾱ, hence the absolute term (ᾱ lies in [0, 1]).
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    if rescale:  # Lin et al. 2023: pure noise at the last step, ᾱ_0 unchanged.
        plain = diffusion.make_schedule(dict(config, rescale_betas_zero_snr=False))
        assert ours[-1] == 0.0 and ours[-2] > 0.0
        np.testing.assert_allclose(ours[0], plain.alphas_cumprod[0], rtol=1e-6)


def test_cosine_schedule_is_the_closed_form():
    """ᾱ_t = f(t+1)/f(0), f(τ) = cos²((τ/T + 0.008)/1.008·π/2), until β reaches its cap."""
    schedule = diffusion.make_schedule({**CONFIG, "beta_schedule": "squaredcos_cap_v2"})
    t = np.arange(1000)

    def f(tau):
        return np.cos((tau / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2

    expected = f(t + 1) / f(0)
    uncapped = t < 990  # Only the last few betas hit the 0.999 cap.
    np.testing.assert_allclose(schedule.alphas_cumprod[uncapped], expected[uncapped], rtol=1e-5)


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_diffusers_noise_and_target(prediction_type, rescale):
    config = {**CONFIG, "prediction_type": prediction_type, "rescale_betas_zero_snr": rescale}
    schedule = diffusion.make_schedule(config)
    ref = diffusers.DDPMScheduler(**config)
    x0 = jax.random.normal(jax.random.key(0), (3, 4, 8, 8))
    noise, t = diffusion.sample_noise(schedule, jax.random.key(1), x0.shape)
    assert t.shape == (3,) and bool(jnp.all((t >= 0) & (t < 1000)))
    t = t.at[0].set(999)  # The last step: pure noise under rescaling.
    noised = diffusion.add_noise(schedule, x0, noise, t)
    x0_t, noise_t, t_t = (torch.from_numpy(np.array(a)) for a in (x0, noise, t))
    np.testing.assert_allclose(
        noised.noisy, ref.add_noise(x0_t, noise_t, t_t).numpy(), rtol=1e-5, atol=1e-5
    )
    expected = noise if prediction_type == "epsilon" else ref.get_velocity(x0_t, noise_t, t_t)
    np.testing.assert_allclose(noised.target, np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_bad_schedule_config():
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion.make_schedule({**CONFIG, "prediction_type": "sample"})
    with pytest.raises(ValueError, match="beta_schedule"):
        diffusion.make_schedule({**CONFIG, "beta_schedule": "cosine"})


def test_mse_is_fp32():
    a = jnp.ones((2, 2), jnp.bfloat16)
    assert diffusion.mse(a, jnp.zeros((2, 2))).dtype == jnp.float32


def _alphas_cumprod(prediction_type):
    """ᾱ_t as diffusers' scheduler computes it, in float64: the reference for the weights."""
    scheduler = diffusers.DDPMScheduler(**CONFIG, prediction_type=prediction_type)
    return scheduler.alphas_cumprod.numpy().astype(np.float64)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_the_closed_form(prediction_type):
    schedule = diffusion.make_schedule({**CONFIG, "prediction_type": prediction_type})
    t = np.array([0, 1, 20, 100, 250, 500, 750, 999])
    gamma = 5.0
    abar = _alphas_cumprod(prediction_type)[t]
    snr = abar / (1 - abar)
    expected = np.minimum(snr, gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    weights = jax.jit(lambda t: diffusion.min_snr_weights(schedule, t, gamma))
    got = np.asarray(weights(jnp.asarray(t)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # High-noise steps (SNR < γ) keep weight 1 for ε; low-noise steps are damped.
    if prediction_type == "epsilon":
        assert got[-1] == 1.0 and got[0] < 0.01


def test_weighted_mse_is_the_mean_of_weighted_example_errors():
    rng = np.random.default_rng(0)
    prediction, target = rng.standard_normal((2, 3, 4, 2, 2)).astype(np.float32)
    weights = np.array([0.5, 1.0, 2.0], np.float32)
    per_example = ((prediction - target) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(
        diffusion.mse(prediction, target, weights), (weights * per_example).mean(), rtol=1e-6
    )


def test_noise_offset_adds_one_value_per_example_and_channel():
    schedule = diffusion.make_schedule(CONFIG)
    rng, shape = jax.random.key(4), (6, 4, 8, 8)
    plain_noise, plain_t = diffusion.sample_noise(schedule, rng, shape)
    options = diffusion.LossOptions(noise_offset=0.1)
    noise, t = diffusion.sample_noise(schedule, rng, shape, options)
    np.testing.assert_array_equal(t, plain_t)  # Only the offset is new.
    offset = np.asarray(noise - plain_noise) / 0.1
    np.testing.assert_allclose(offset, np.broadcast_to(offset[:, :, :1, :1], shape), atol=1e-5)
    z = offset[:, :, 0, 0]
    assert np.unique(z.round(5)).size == z.size  # Its own value for every example and channel.
    assert 0.3 < z.std() < 3


def test_timestep_range_bounds_the_draws():
    schedule = diffusion.make_schedule(CONFIG)
    rng, shape = jax.random.key(5), (4096, 1, 1, 1)
    options = diffusion.LossOptions(timestep_min=200, timestep_max=300)
    _, t = diffusion.sample_noise(schedule, rng, shape, options)
    assert int(t.min()) == 200 and int(t.max()) == 299  # [min, max), both ends reached.
    # The default range is [0, T), and draws exactly as before the options existed.
    _, t_default = diffusion.sample_noise(schedule, rng, shape)
    expected = jax.random.randint(jax.random.split(rng)[1], (4096,), 0, 1000)
    np.testing.assert_array_equal(t_default, expected)
    assert diffusion.LossOptions(timestep_max=1000).timestep_range(schedule) == (0, 1000)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"timestep_min": -1}, "train.timestep_min"),
        ({"timestep_min": 10, "timestep_max": 10}, "train.timestep_max"),
        ({"noise_offset": -0.1}, "train.noise_offset"),
        ({"min_snr_gamma": -5.0}, "train.min_snr_gamma"),
    ],
)
def test_bad_loss_options_name_the_field(options, match):
    with pytest.raises(errors.ConfigError, match=match):
        diffusion.LossOptions(**options)


def test_timestep_range_past_the_schedule_is_an_error():
    schedule = diffusion.make_schedule(CONFIG)
    for options in (diffusion.LossOptions(timestep_max=1001), diffusion.LossOptions(1000)):
        with pytest.raises(errors.ConfigError, match="schedule has 1000 timesteps"):
            options.timestep_range(schedule)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_inverts_add_noise_given_the_target(prediction_type):
    schedule = diffusion.make_schedule({**CONFIG, "prediction_type": prediction_type})
    x0 = jax.random.normal(jax.random.key(2), (4, 4, 8, 8))
    noise = jax.random.normal(jax.random.key(3), x0.shape)
    t = jnp.array([0, 250, 700, 999])
    noised = diffusion.add_noise(schedule, x0, noise, t)
    got = diffusion.predict_x0(schedule, noised.noisy, t, noised.target)
    np.testing.assert_allclose(got, x0, rtol=1e-4, atol=2e-4)
    # The other parameterisation's formula does not invert it: the test can fail.
    other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
    wrong = diffusion.predict_x0(schedule._replace(prediction_type=other), noised.noisy, t,
                                 noised.target)  # fmt: skip
    assert not np.allclose(wrong, x0, atol=1e-2)
