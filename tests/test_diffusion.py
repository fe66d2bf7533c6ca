import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlaxDDPMScheduler
from diffusers.schedulers.scheduling_utils_flax import add_noise_common, get_velocity_common

from nsync_jax import diffusion

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
