import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlaxDDPMScheduler
from diffusers.schedulers.scheduling_utils_flax import add_noise_common, get_velocity_common

from nsync_jax import diffusion, errors

CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_diffusers_schedule_noise_and_target(prediction_type):
    config = {**CONFIG, "prediction_type": prediction_type}
    schedule = diffusion.make_schedule(config)
    ours = FlaxDDPMScheduler.from_config(config)
    state = ours.create_state()
    np.testing.assert_allclose(schedule.alphas_cumprod, state.common.alphas_cumprod, rtol=1e-6)
    x0 = jax.random.normal(jax.random.key(0), (3, 4, 8, 8))
    noise, t = diffusion.sample_noise(schedule, jax.random.key(1), x0.shape)
    assert t.shape == (3,) and bool(jnp.all((t >= 0) & (t < 1000)))
    noised = diffusion.add_noise(schedule, x0, noise, t)
    np.testing.assert_allclose(
        noised.noisy, add_noise_common(state.common, x0, noise, t), rtol=1e-5, atol=1e-6
    )
    expected = (
        noise if prediction_type == "epsilon" else get_velocity_common(state.common, x0, noise, t)
    )
    np.testing.assert_allclose(noised.target, expected, rtol=1e-5, atol=1e-6)


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
    state = FlaxDDPMScheduler.from_config({**CONFIG, "prediction_type": prediction_type})
    return np.asarray(state.create_state().common.alphas_cumprod, np.float64)


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
