"""The training loss and the gradient of every parameter equal PyTorch's, at fp32.

A tiny SD1-like (ε, conv `proj_in`) and SD2-like (v, linear `proj_in`, upcast attention)
pipeline are written by PyTorch diffusers (`sd_folders`), loaded by `weights.load_pretrained`
(the path users take), and one training loss is computed in both frameworks on the same
pixels, posterior noise, diffusion noise and timesteps: VAE posterior sample → scaled
latents → noised at t → UNet on the text encoder's context → MSE to the ε or v target. The
gradient flows into the UNet and the text encoder (what `unet_text_encoder` trains).
"""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sd_folders
import torch
from flax.traverse_util import flatten_dict

from configs import demo
from nsync_jax import diffusion, weights

# Loss: fp32 parity, 1e-5 relative. Gradients: each leaf within 1e-4 of its own largest
# entry: a gradient is a long chain of reordered fp32 sums (XLA vs oneDNN convolutions
# and matmuls, forward and backward), which moves it by a few 1e-6 of its scale here; a
# wrong name, layout, transpose or activation moves it by far more. Leaves whose gradient
# is zero in exact arithmetic (the bias of a conv right before a GroupNorm, which removes
# it) hold only rounding noise: they are held to 1e-6 of the component's largest gradient.
LOSS_RTOL = 1e-5
GRAD_TOL = 1e-4
ZERO_FLOOR = 1e-6
PROMPTS = ["a red circle in the style of painting", "two blue squares"]


def _model_config(directory):
    config = demo.get_config().model
    config.source, config.pretrained, config.resolution = "pretrained", directory, 32
    return config


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pipeline(request, tmp_path_factory):
    root = str(tmp_path_factory.mktemp(request.param))
    torch_models = sd_folders.write_pipeline(root, sd2=request.param == "sd2")
    model, params = weights.load_pretrained(_model_config(root))
    return model, params, torch_models


def _inputs(model):
    rng = np.random.default_rng(0)
    side = model.resolution
    latent_side = side // model.vae_scale_factor
    return {
        "pixels": rng.uniform(-1, 1, (2, 3, side, side)).astype(np.float32),
        # The posterior's ε in the NHWC layout `posterior_moments` returns.
        "eps": rng.standard_normal((2, latent_side, latent_side, 4)).astype(np.float32),
        "noise": rng.standard_normal((2, 4, latent_side, latent_side)).astype(np.float32),
        "timesteps": np.array([17, 803], np.int32),
        "ids": np.asarray(model.tokenize(PROMPTS), np.int32),
    }


def _jax_loss_and_grads(model, params, inputs):
    schedule = diffusion.make_schedule(model.scheduler_config)

    def loss(trainable):
        mean, std = model.posterior_moments(params["vae"], inputs["pixels"])
        latents = model.latents_from_moments(mean, std, inputs["eps"])
        noised = diffusion.add_noise(schedule, latents, inputs["noise"], inputs["timesteps"])
        context = model.encode_text(trainable["text_encoder"], inputs["ids"])
        prediction = model.predict_noise(trainable["unet"], noised.noisy, noised.timesteps, context)
        return diffusion.mse(prediction, noised.target)

    trainable = {"unet": params["unet"], "text_encoder": params["text_encoder"]}
    return jax.jit(jax.value_and_grad(loss))(trainable)


def _torch_loss_and_grads(model, torch_models, inputs):
    unet, vae, text = (torch_models[k] for k in ("unet", "vae", "text_encoder"))
    scheduler = diffusers.DDPMScheduler.from_config(model.scheduler_config)
    for module in (unet, text):
        module.zero_grad()
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(inputs["pixels"])).latent_dist
        eps = torch.from_numpy(inputs["eps"]).permute(0, 3, 1, 2)
        latents = (posterior.mean + posterior.std * eps) * vae.config.scaling_factor
        noise = torch.from_numpy(inputs["noise"])
        timesteps = torch.from_numpy(inputs["timesteps"]).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if model.prediction_type == "epsilon":
            target = noise
        else:
            target = scheduler.get_velocity(latents, noise, timesteps)
    context = text(input_ids=torch.from_numpy(inputs["ids"]).long()).last_hidden_state
    prediction = unet(noisy, timesteps, context).sample
    loss = torch.nn.functional.mse_loss(prediction, target)
    loss.backward()
    grads = {}
    for component, module in (("unet", unet), ("text_encoder", text)):
        grads[component] = {k: p.grad.numpy() for k, p in module.named_parameters()}
    return float(loss), grads


def test_loss_and_every_gradient_match_pytorch(pipeline):
    model, params, torch_models = pipeline
    inputs = _inputs(model)
    value, grads = _jax_loss_and_grads(model, params, inputs)
    torch_value, torch_grads = _torch_loss_and_grads(model, torch_models, inputs)
    np.testing.assert_allclose(float(value), torch_value, rtol=LOSS_RTOL)
    checked = 0
    for component in ("unet", "text_encoder"):
        stored_key = weights.stored_key_rule(component, torch_grads[component])
        floor = ZERO_FLOOR * max(float(np.abs(g).max()) for g in torch_grads[component].values())
        for path, grad in flatten_dict(grads[component]).items():
            key = stored_key(weights.torch_key(path))
            expected = weights.to_flax_layout(path[-1], torch_grads[component].pop(key))
            scale = float(np.abs(expected).max())
            error = float(jnp.abs(grad - expected).max())
            assert error <= max(GRAD_TOL * scale, floor), (
                f"{component} {key}: gradient differs by {error:.3g} (scale {scale:.3g})"
            )
            checked += 1
        # Every PyTorch parameter had its counterpart (the token embedding's gradient
        # included: only the prompts' rows are nonzero).
        assert not torch_grads[component], sorted(torch_grads[component])[:5]
    assert checked > 100
