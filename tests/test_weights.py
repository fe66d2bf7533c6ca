"""Loading PyTorch diffusers folders into the Flax modules gives the PyTorch outputs.

Tiny PyTorch models (diffusers' UNet2DConditionModel and AutoencoderKL, transformers'
CLIPTextModel) with random weights are saved as a diffusers folder in safetensors, loaded
with `weights.load_pretrained`, and run on the same inputs in both frameworks.
"""

import functools
import json
import os
import shutil

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from configs import demo
from nsync_jax import sharding, weights

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import sd_folders  # noqa: E402  (needs torch)

MAX_LENGTH = sd_folders.MAX_LENGTH
TEXT_HIDDEN = sd_folders.TEXT_HIDDEN
ATOL = 1e-4


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sd1"))
    return root, sd_folders.write_pipeline(root, sd2=False)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sd2"))
    return root, sd_folders.write_pipeline(root, sd2=True)


def _model_config(directory, param_dtype="float32"):
    config = demo.get_config().model
    config.source = "pretrained"
    config.pretrained = directory
    config.param_dtype = param_dtype
    return config


def _match_flax_geglu(unet):
    """The PyTorch reference with diffusers' Flax GEGLU activation (tanh-approximate GELU).

    The two diffusers UNets differ there by up to ~5e-4 per activation (see
    test_export.py); matched, any loading mistake shows far above the tolerance.
    """
    for module in unet.modules():
        if isinstance(module, diffusers.models.activations.GEGLU):
            module.gelu = functools.partial(torch.nn.functional.gelu, approximate="tanh")
    return unet


def _check_unet(model, params, torch_unet):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    timesteps = np.array([10, 500], np.int32)
    context = rng.standard_normal((2, MAX_LENGTH, TEXT_HIDDEN), dtype=np.float32)
    flax_out = jax.jit(model.predict_noise)(params["unet"], latents, timesteps, context)
    with torch.no_grad():
        torch_out = _match_flax_geglu(torch_unet)(
            torch.from_numpy(latents), torch.from_numpy(timesteps), torch.from_numpy(context)
        ).sample
    np.testing.assert_allclose(np.asarray(flax_out), torch_out.numpy(), atol=ATOL, rtol=ATOL)


def _check_text(model, params, torch_text):
    ids = model.tokenize(["a red circle in the style of painting", "two blue squares"])
    flax_out = jax.jit(model.encode_text)(params["text_encoder"], ids)
    with torch.no_grad():
        torch_out = torch_text(input_ids=torch.from_numpy(ids).long()).last_hidden_state
    np.testing.assert_allclose(np.asarray(flax_out), torch_out.numpy(), atol=ATOL, rtol=ATOL)


def test_sd1_like_outputs_match_pytorch(sd1):
    root, torch_models = sd1
    model, params = weights.load_pretrained(_model_config(root))
    assert model.prediction_type == "epsilon"
    assert model.scheduler_config["_class_name"] == "PNDMScheduler"
    assert not model.unet.config.use_linear_projection
    _check_unet(model, params, torch_models["unet"])
    _check_text(model, params, torch_models["text_encoder"])

    pixels = np.random.default_rng(1).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    vae = model.vae
    mean = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode).latent_dist.mean)
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode).sample)
    latents = np.random.default_rng(2).standard_normal((1, 4, 16, 16), dtype=np.float32)
    posterior_mean, decoded = mean(params["vae"], pixels), decode(params["vae"], latents)
    with torch.no_grad():
        torch_mean = torch_models["vae"].encode(torch.from_numpy(pixels)).latent_dist.mean
        torch_decoded = torch_models["vae"].decode(torch.from_numpy(latents)).sample
    np.testing.assert_allclose(
        np.transpose(np.asarray(posterior_mean), (0, 3, 1, 2)),
        torch_mean.numpy(),
        atol=ATOL,
        rtol=ATOL,
    )
    np.testing.assert_allclose(np.asarray(decoded), torch_decoded.numpy(), atol=ATOL, rtol=ATOL)


def test_sd2_like_outputs_match_pytorch(sd2):
    root, torch_models = sd2
    model, params = weights.load_pretrained(_model_config(root))
    assert model.prediction_type == "v_prediction"
    assert model.unet.config.use_linear_projection
    assert tuple(model.unet.config.attention_head_dim) == (2, 4)
    assert params["unet"]["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].ndim == 2
    _check_unet(model, params, torch_models["unet"])
    _check_text(model, params, torch_models["text_encoder"])


def test_bf16_params_load_into_shardings(sd1):
    root, _ = sd1
    mesh = sharding.make_mesh(_mesh_config(fsdp=8))
    model, params = weights.load_pretrained(
        _model_config(root, "bfloat16"), lambda shapes: sharding.tree_shardings(mesh, shapes)
    )
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(params)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    kernel = params["unet"]["mid_block"]["resnets_0"]["conv1"]["kernel"]  # (3, 3, 64, 64)
    assert kernel.sharding.spec == sharding.fsdp_spec(kernel.shape, 8)
    assert kernel.sharding.spec != jax.sharding.PartitionSpec()
    assert len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.size == kernel.size // 8
    _, fp32 = weights.load_pretrained(_model_config(root))
    reference = fp32["unet"]["mid_block"]["resnets_0"]["conv1"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(reference.astype(jnp.bfloat16)))


def _mesh_config(fsdp):
    config = demo.get_config().mesh
    config.data, config.fsdp = 1, fsdp
    return config


@pytest.fixture(scope="module")
def sd1_shapes(sd1):
    root, _ = sd1
    model = weights.load_modules(root, _model_config(root))
    return weights.param_shapes(model, jnp.float32)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop("text_model.final_layer_norm.weight"),
            "missing text_model.final_layer_norm.weight",
        ),
        (lambda t: t.update(extra=np.zeros(3, np.float32)), "unexpected extra"),
        (
            lambda t: t.update(
                {"text_model.encoder.layers.1.mlp.fc1.weight": np.zeros((32, 64), np.float32)}
            ),
            r"wrong shape text_model.encoder.layers.1.mlp.fc1.weight \(32, 64\) "
            r"\(expected \(64, 32\)\)",
        ),
    ],
    ids=["missing", "unexpected", "misshapen"],
)
def test_mismatched_tensor_is_named(sd1, sd1_shapes, tmp_path, edit, message):
    root, _ = sd1
    tensors = load_file(os.path.join(root, "text_encoder", "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
        weights.load_component_params(
            str(tmp_path), "text_encoder", sd1_shapes["text_encoder"], jnp.float32
        )


def test_buffers_and_legacy_vae_attention_names_load(sd1, sd1_shapes, tmp_path):
    root, _ = sd1
    shapes = sd1_shapes
    text = load_file(os.path.join(root, "text_encoder", "model.safetensors"))
    text["text_model.embeddings.position_ids"] = np.arange(MAX_LENGTH)[None]
    os.makedirs(tmp_path / "text")
    save_file(text, str(tmp_path / "text" / "model.safetensors"))
    weights.load_component_params(
        str(tmp_path / "text"), "text_encoder", shapes["text_encoder"], jnp.float32
    )

    vae = load_file(os.path.join(root, "vae", "diffusion_pytorch_model.safetensors"))
    legacy = {}
    for key, value in vae.items():
        for new, old in ((".to_q.", ".query."), (".to_out.0.", ".proj_attn.")):
            key = key.replace(new, old)
        legacy[key] = value
    assert any(".proj_attn." in k for k in legacy)
    os.makedirs(tmp_path / "vae")
    save_file(legacy, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    loaded = weights.load_component_params(str(tmp_path / "vae"), "vae", shapes["vae"], jnp.float32)
    reference = weights.load_component_params(
        os.path.join(root, "vae"), "vae", shapes["vae"], jnp.float32
    )
    jax.tree.map(np.testing.assert_array_equal, loaded, reference)


def test_flax_msgpack_loads_and_is_checked(sd1, sd1_shapes, tmp_path):
    root, _ = sd1
    shapes = sd1_shapes["text_encoder"]
    reference = weights.load_component_params(
        os.path.join(root, "text_encoder"), "text_encoder", shapes, jnp.float32
    )
    as_numpy = jax.tree.map(np.asarray, reference)
    with open(tmp_path / "flax_model.msgpack", "wb") as f:
        f.write(flax.serialization.msgpack_serialize(as_numpy))
    loaded = weights.load_component_params(str(tmp_path), "text_encoder", shapes, jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, loaded, reference)

    del as_numpy["text_model"]["final_layer_norm"]
    with open(tmp_path / "flax_model.msgpack", "wb") as f:
        f.write(flax.serialization.msgpack_serialize(as_numpy))
    with pytest.raises(ValueError, match="missing text_model/final_layer_norm/bias"):
        weights.load_component_params(str(tmp_path), "text_encoder", shapes, jnp.float32)


def test_missing_weights_and_unsupported_config_are_errors(sd1, tmp_path):
    root, _ = sd1
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        weights.find_weights(str(tmp_path), "unet")
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    config_path = copy / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["norm_num_groups"] = 16
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="norm_num_groups=16"):
        weights.load_modules(str(copy), _model_config(str(copy)))
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub id"):
        weights.resolve_pretrained(_model_config(str(tmp_path / "absent")))


def test_hub_id_is_fetched_with_safetensors_patterns(sd1, monkeypatch):
    root, _ = sd1
    calls = []

    def fake_snapshot_download(repo_id, revision, allow_patterns):
        calls.append((repo_id, revision, allow_patterns))
        return root

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    config = _model_config("org/model")
    config.revision = "abc"
    assert weights.resolve_pretrained(config) == root
    assert len(calls) == 1  # Every component had safetensors: no msgpack fetch.
    repo_id, revision, patterns = calls[0]
    assert (repo_id, revision) == ("org/model", "abc")
    assert "unet/diffusion_pytorch_model.safetensors" in patterns
    assert "text_encoder/model.safetensors" in patterns
    assert not any(p.endswith((".bin", ".msgpack")) for p in patterns)


def test_torch_key_rule():
    assert (
        weights.torch_key(("time_embedding", "linear_1", "kernel"))
        == "time_embedding.linear_1.weight"
    )
    assert (
        weights.torch_key(
            ("up_blocks_1", "attentions_0", "transformer_blocks_0", "attn1", "to_out_0", "bias")
        )
        == "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.bias"
    )
    assert (
        weights.torch_key(("decoder", "mid_block", "attentions_0", "proj_attn", "kernel"))
        == "decoder.mid_block.attentions.0.to_out.0.weight"
    )
    assert weights.torch_key(("conv_norm_out", "scale")) == "conv_norm_out.weight"
    flat = flatten_dict({"a": {"kernel": np.zeros((3, 3, 4, 8))}})
    assert weights.torch_shape("kernel", flat[("a", "kernel")].shape) == (8, 4, 3, 3)
