"""Our Flax UNet against diffusers' PyTorch `UNet2DConditionModel` on the same weights.

Every tiny config is built in PyTorch from `UNetConfig.to_dict()` (so the dict must load in
diffusers), its state dict mapped into our tree by `weights.torch_key` / `to_flax_layout`
(every parameter found, every tensor used), and outputs and gradients compared at fp32.
GroupNorm and LayerNorm weights are perturbed off their 1/0 init so a misnamed or
misplaced norm parameter shows, and the configs use GroupNorm(8) and (16), not diffusers'
default 32, so parity shows `norm_num_groups` is read from the config.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax.traverse_util import flatten_dict, unflatten_dict

from nsync_jax import errors, weights
from nsync_jax.models import unet

_TINY = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
)
CONFIGS = {
    # SD 1.x: conv proj_in/out, `attention_head_dim` read as the head count (4 heads of 8
    # and of 16 channels), GroupNorm(8).
    "sd1": dict(
        _TINY,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        norm_num_groups=8,
    ),
    # SD 2.x: linear projections, heads per block, scores in fp32, GroupNorm(16).
    "sd2": dict(
        _TINY,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=16,
    ),
    # SDXL: attention only in the deeper block, transformer depth per block, text_time.
    "sdxl": dict(
        _TINY,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=16,
    ),
    # The other knobs: centred input, cos/sin order and shift, per-block depth and
    # only-cross attention, a padding-0 downsampler, a mid-block output scale, the ResNets'
    # GroupNorm epsilon, and a sample side the UNet cannot halve evenly (the upsampler
    # resizes to the skip's size).
    "knobs": dict(
        _TINY,
        sample_size=(7, 9),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=(1, 2),
        only_cross_attention=(True, False),
        attention_head_dim=(2, 4),
        center_input_sample=True,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        mid_block_scale_factor=1.5,
        norm_num_groups=16,
        norm_eps=1e-3,
    ),
}
BATCH, TOKENS = 2, 5


def torch_params(model: unet.UNet2DConditionModel, tensors: dict[str, np.ndarray]) -> dict:
    """`tensors` (a PyTorch state dict or its gradients) in our tree, by the weights rule;
    every parameter must be found with its shape and every tensor used."""
    shapes = flatten_dict(jax.eval_shape(model.init_weights, jax.random.key(0)))
    params = {}
    for path, leaf in shapes.items():
        key = weights.torch_key(path)
        assert key in tensors, f"{'/'.join(path)}: no PyTorch tensor {key}"
        params[path] = weights.to_flax_layout(path[-1], tensors[key])
        assert params[path].shape == leaf.shape, f"{key}: {params[path].shape} vs {leaf.shape}"
    unused = set(tensors) - {weights.torch_key(p) for p in shapes}
    assert not unused, f"PyTorch tensors with no parameter: {sorted(unused)}"
    return unflatten_dict(params)


@functools.cache
def case(name: str):
    """(config, torch model, our params, inputs as NumPy) of one config, built once."""
    config = unet.UNetConfig(**CONFIGS[name])
    torch.manual_seed(0)
    torch_model = TorchUNet.from_config(config.to_dict()).eval()
    with torch.no_grad():
        for key, p in torch_model.named_parameters():
            if "norm" in key:
                p.add_(0.2 * torch.randn_like(p))
            if "proj_in" in key:  # Small LayerNorm inputs, so its epsilon shows in the output.
                p.mul_(0.1)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    params = torch_params(unet.UNet2DConditionModel(config), state)
    rng = np.random.default_rng(0)
    height, width = config.sample_hw
    inputs = {
        "sample": rng.standard_normal((BATCH, 4, height, width), np.float32),
        "timesteps": np.array([3, 999]),
        "encoder_hidden_states": rng.standard_normal((BATCH, TOKENS, 32), np.float32),
    }
    if config.addition_embed_type == "text_time":
        inputs["timesteps"] = np.float32(421.5)  # A scalar, and fractional.
        inputs["added_cond_kwargs"] = {
            "text_embeds": rng.standard_normal((BATCH, 32), np.float32),
            "time_ids": np.array([[8, 8, 0, 0, 8, 8], [16, 12, 2, 1, 8, 8]], np.float32),
        }
    return config, torch_model, params, inputs


def torch_inputs(inputs: dict) -> dict:
    as_torch = lambda x: torch.tensor(np.asarray(x))  # noqa: E731
    out = {k: as_torch(v) for k, v in inputs.items() if k != "added_cond_kwargs"}
    out["timestep"] = out.pop("timesteps")
    if "added_cond_kwargs" in inputs:
        out["added_cond_kwargs"] = {k: as_torch(v) for k, v in inputs["added_cond_kwargs"].items()}
    return out


def target_of(inputs: dict) -> np.ndarray:
    return np.random.default_rng(1).standard_normal(inputs["sample"].shape, np.float32)


# Tiny graphs run in microseconds; LLVM's optimisation passes would cost a third of the
# file's compile time.
_JIT_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.cache
def forward(config: unet.UNetConfig, **fields):
    """A jitted `(params, inputs) -> output` of our UNet, one per model."""
    model = unet.UNet2DConditionModel(config, **fields)
    return jax.jit(
        lambda params, inputs: model.apply({"params": params}, **inputs),
        compiler_options=_JIT_OPTIONS,
    )


@functools.cache
def output_and_grad(config: unet.UNetConfig, **fields):
    """A jitted `(params, inputs, target) -> (output, d mse / d params)`."""
    model = unet.UNet2DConditionModel(config, **fields)

    def loss(params, inputs, target):
        out = model.apply({"params": params}, **inputs)
        return jnp.mean((out - target) ** 2), out

    def run(params, inputs, target):
        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params, inputs, target)
        return out, grads

    return jax.jit(run, compiler_options=_JIT_OPTIONS)


def assert_close(ours, ref, rtol=1e-5, atol_of_max=1e-5):
    ref = np.asarray(ref)
    np.testing.assert_allclose(
        np.asarray(ours), ref, rtol=rtol, atol=atol_of_max * np.abs(ref).max()
    )


def torch_output(torch_model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return torch_model(**torch_inputs(inputs)).sample.numpy()


@pytest.mark.parametrize("name", ["sd1", "sd2", "knobs"])
def test_output_matches_torch(name):
    config, torch_model, params, inputs = case(name)
    ours = forward(config)(params, inputs)
    ref = torch_output(torch_model, inputs)
    assert ours.shape == ref.shape == inputs["sample"].shape
    # Same math, other summation orders (XLA vs oneDNN convs): ~1e-6 of the output's scale.
    assert_close(ours, ref)


def test_output_and_gradients_match_torch():
    """SDXL's output, and d MSE(output, target) / d every parameter against PyTorch autograd
    (one compile gives both; the gradient compile is this file's dearest, so one config:
    the one with linear projections, two-deep transformers and the added embedding)."""
    config, torch_model, params, inputs = case("sdxl")
    target = target_of(inputs)
    out, grads = output_and_grad(config)(params, inputs, target)
    assert_close(out, torch_output(torch_model, inputs))
    torch_model.zero_grad()
    ref_out = torch_model(**torch_inputs(inputs)).sample
    torch.mean((ref_out - torch.from_numpy(target)) ** 2).backward()
    ref = flatten_dict(
        torch_params(
            unet.UNet2DConditionModel(config),
            {k: p.grad.numpy() for k, p in torch_model.named_parameters()},
        )
    )
    # Per leaf: rtol 1e-5 with atol 1e-4 of the leaf's largest gradient. Gradients sum over
    # batch and pixels, so elements near zero carry the cancellation error of the big ones:
    # only a bound relative to the leaf is meaningful. The worst leaves measured ~2e-5: the
    # self-attention to_q/to_k kernels, whose gradients pass through the softmax's
    # cancellations and the small-input LayerNorm (proj_in scaled down in `case`).
    for path, g in flatten_dict(grads).items():
        np.testing.assert_allclose(
            g, ref[path], rtol=1e-5, atol=1e-4 * np.abs(ref[path]).max(), err_msg="/".join(path)
        )


def test_attention_kinds_agree():
    config, _, params, inputs = case("sd2")
    outs = {
        kind: forward(config, attention=kind)(params, inputs)
        for kind in ("xla", "dot_product", "chunked")
    }
    assert_close(outs["dot_product"], outs["xla"])
    assert_close(outs["chunked"], outs["xla"])


def test_bfloat16_compute():
    """bf16 activations (fp32 parameters and norm statistics) stay near the fp32 output."""
    config, _, params, inputs = case("sd2")
    ours = forward(config, dtype=jnp.bfloat16)(params, inputs)
    assert ours.dtype == jnp.bfloat16
    ref = np.asarray(forward(config)(params, inputs))
    # bf16 keeps 8 bits of mantissa: ~1% of the output's scale after a dozen layers.
    error = np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max()
    assert error < 3e-2


def test_remat_blocks_changes_nothing():
    config, _, params, inputs = case("sdxl")
    target = target_of(inputs)
    out, grads = output_and_grad(config)(params, inputs, target)
    out_remat, grads_remat = output_and_grad(config, remat="blocks")(params, inputs, target)
    # The same ops, but XLA fuses the recomputed blocks its own way: equal to fp32 rounding,
    # not bitwise, with the gradient parity's per-leaf bound (rounding differences grow the
    # same way through the small-input LayerNorms' backward; a remat bug would be O(1)).
    assert_close(out_remat, out)
    jax.tree.map(lambda a, b: assert_close(a, b, atol_of_max=1e-4), grads_remat, grads)


def test_lora_on_to_q_equals_the_merged_kernel():
    config, _, params, inputs = case("sd2")
    scale, rank = 0.5, 2
    rng = np.random.default_rng(2)
    with_lora, merged = {}, {}
    for path, value in flatten_dict(params).items():
        with_lora[path] = merged[path] = value
        if path[-2:] == ("to_q", "kernel"):
            a = rng.standard_normal((value.shape[0], rank), np.float32) * 0.3
            b = rng.standard_normal((rank, value.shape[1]), np.float32) * 0.3
            with_lora[(*path[:-1], "lora_a")], with_lora[(*path[:-1], "lora_b")] = a, b
            merged[path] = value + scale * a @ b
    # attn1 and attn2 of the transformers of down_blocks_0, mid_block and up_blocks_1 (2).
    assert sum(p[-1] == "lora_a" for p in with_lora) == 8
    ours = forward(config, lora_scale=scale)(unflatten_dict(with_lora), inputs)
    # Without adapters lora_scale changes nothing: the parity test's compiled forward.
    ref = forward(config)(unflatten_dict(merged), inputs)
    plain = forward(config)(params, inputs)
    assert np.abs(np.asarray(ref) - np.asarray(plain)).max() > 1e-3  # The adapters matter.
    assert_close(ours, ref)


def test_config_dict_round_trip_and_diffusers_keys():
    config = unet.UNetConfig(**CONFIGS["sdxl"])
    d = config.to_dict()
    assert d["_class_name"] == "UNet2DConditionModel"
    assert d["attention_head_dim"] == [2, 4]  # JSON-ready lists.
    assert unet.UNetConfig.from_dict(d) == config
    # A diffusers config.json: private keys skipped, defaults of unbuilt blocks accepted.
    extra = {"_diffusers_version": "0.42.1", "dropout": 0.0, "resnet_skip_time_act": True}
    assert unet.UNetConfig.from_dict({**d, **extra}) == config


def test_head_counts_as_diffusers_reads_them():
    sd1 = unet.UNetConfig(**CONFIGS["sd1"])
    assert [s.heads for s in sd1.down_specs()] == [4, 4]
    explicit = unet.UNetConfig(**{**CONFIGS["sd2"], "num_attention_heads": (1, 8)})
    assert [s.heads for s in explicit.down_specs()] == [1, 8]
    assert [s.heads for s in explicit.up_specs()] == [8, 1]
    assert explicit.mid_spec().heads == 8


def test_no_mid_block_matches_torch_names():
    """`mid_block_type: null` builds no mid block, as in diffusers."""
    config = unet.UNetConfig(**{**CONFIGS["sd1"], "mid_block_type": None})
    torch.manual_seed(0)
    state = {k: v.numpy() for k, v in TorchUNet.from_config(config.to_dict()).state_dict().items()}
    params = torch_params(unet.UNet2DConditionModel(config), state)
    assert "mid_block" not in params


@pytest.mark.parametrize(
    "field, value",
    [
        ("act_fn", "gelu"),
        ("dual_cross_attention", True),
        ("resnet_time_scale_shift", "scale_shift"),
        ("class_embed_type", "timestep"),
        ("time_cond_proj_dim", 16),
        ("conv_in_kernel", 5),
        ("addition_embed_type", "text"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),
        ("transformer_layers_per_block", [[1, 2], 1]),
        ("norm_num_groups", 24),
        ("time_embedding_type", "fourier"),
        ("attention_type", "gated"),
        ("some_new_option", 1),
    ],
)
def test_unsupported_config_values_are_refused(field, value):
    d = {**unet.UNetConfig(**CONFIGS["sd1"]).to_dict(), field: value}
    with pytest.raises(errors.ConfigError, match=field):
        unet.UNetConfig.from_dict(d)
