"""`models/vae.py` against diffusers' PyTorch `AutoencoderKL` on the same random weights.

The weights reach our tree through `weights.torch_key` / `match_torch_keys` /
`to_flax_layout`, as a diffusers folder's do; the GroupNorms get random scales and biases
so a swapped pair or a wrong group count shows.
"""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

from nsync_jax import errors, weights
from nsync_jax.models import vae as vae_lib

# Eight groups of 2 and 4 channels (not diffusers' 32), three levels, two ResNets a block.
TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)


def _torch_vae(**overrides):
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return model


def _our_params(model: vae_lib.AutoencoderKL, state: dict[str, torch.Tensor]):
    """The PyTorch state dict in our tree, as `weights.load_component_params` maps it."""
    expected = flatten_dict(jax.eval_shape(model.init_weights, jax.random.key(0)))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    keys = weights.match_torch_keys(
        "torch", expected, shapes, weights.stored_key_rule("vae", shapes)
    )
    assert sorted(keys.values()) == sorted(state)  # Every tensor used.
    flat = {
        p: jnp.asarray(weights.to_flax_layout(p[-1], state[k].numpy())) for p, k in keys.items()
    }
    return unflatten_dict(flat)


def _close(ours, ref, rtol=1e-5):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    # XLA's and oneDNN's fp32 convolutions sum in different orders: agreement to ~1e-6
    # of the largest value, hence the absolute part.
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False)],
    ids=["default", "no_attention_no_quant_convs"],
)
def test_encode_and_decode_match_diffusers(overrides):
    reference = _torch_vae(**overrides)
    config = vae_lib.VAEConfig.from_dict(dict(reference.config))
    assert config.norm_num_groups == 8 and config.shift_factor == pytest.approx(0.1159)
    model = vae_lib.AutoencoderKL(config)
    params = _our_params(model, reference.state_dict())

    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    latents = np.random.default_rng(1).normal(size=(2, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        posterior = reference.encode(torch.from_numpy(pixels)).latent_dist
        decoded = reference.decode(torch.from_numpy(latents)).sample

    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))
    ours = encode(params, pixels)
    _close(ours.mean, posterior.mean.numpy())
    _close(ours.logvar, posterior.logvar.numpy())
    _close(ours.std, posterior.std.numpy())
    _close(decode(params, latents), decoded.numpy())


def test_posterior_sample_and_latent_scaling():
    config = vae_lib.VAEConfig(**TINY)
    mean = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 3, 3)), jnp.float32)
    logvar = jnp.asarray(np.random.default_rng(3).uniform(-4, 1, (2, 4, 3, 3)), jnp.float32)
    posterior = vae_lib.DiagonalGaussian(mean, logvar)
    rng = jax.random.key(7)
    # The draw callers rely on: ε of `mean`'s shape from the key itself.
    eps = np.asarray(jax.random.normal(rng, mean.shape))
    expected = np.asarray(mean) + np.exp(0.5 * np.asarray(logvar)) * eps
    np.testing.assert_allclose(posterior.sample(rng), expected, rtol=1e-6, atol=1e-6)

    z = np.asarray(mean)
    scaled = vae_lib.scale_latents(z, config)
    np.testing.assert_allclose(scaled, (z - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(vae_lib.unscale_latents(scaled, config), z, rtol=1e-5, atol=1e-6)
    unshifted = vae_lib.VAEConfig(**{**TINY, "shift_factor": None})
    np.testing.assert_allclose(vae_lib.scale_latents(z, unshifted), z * 0.3611, rtol=1e-6)


def test_config_round_trip_through_diffusers():
    config = vae_lib.VAEConfig(**TINY)
    saved = config.to_dict()
    assert saved["_class_name"] == "AutoencoderKL"
    reference = diffusers.AutoencoderKL.from_config(saved)
    assert vae_lib.VAEConfig.from_dict(dict(reference.config)) == config
    # diffusers' own defaults for what an old config.json leaves out.
    assert vae_lib.VAEConfig.from_dict(
        {"_diffusers_version": "0.2"}
    ) == vae_lib.VAEConfig.from_dict(dict(diffusers.AutoencoderKL().config))


@pytest.mark.parametrize(
    "field, value",
    [
        ("act_fn", "gelu"),
        (
            "down_block_types",
            ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"],
        ),
        ("up_block_types", ["UpDecoderBlock2D"] * 2),
        ("norm_num_groups", 5),
        ("latents_mean", [0.0] * 4),
        ("shift_factor", "0.1"),
        ("no_such_field", 1),
    ],
)
def test_unsupported_config_names_the_field(field, value):
    with pytest.raises(errors.ConfigError, match=field):
        vae_lib.VAEConfig.from_dict({**TINY, field: value})
