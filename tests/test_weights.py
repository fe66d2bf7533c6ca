"""Loading PyTorch diffusers folders into our Flax modules gives the PyTorch outputs.

Tiny PyTorch models (diffusers' UNet2DConditionModel and AutoencoderKL, transformers'
CLIPTextModel) with random weights are saved as a diffusers folder in safetensors, loaded
with `weights.load_pretrained`, and run on the same inputs in both frameworks.
"""

import json
import os
import pickle
import shutil
import sys

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sd_folders
import torch
import transformers
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from configs import demo
from nsync_jax import clip_tokenizer, errors, sharding, torch_pickle, weights

MAX_LENGTH = sd_folders.MAX_LENGTH
TEXT_HIDDEN = sd_folders.TEXT_HIDDEN
# fp32 parity: relative 1e-5, and an absolute floor of 1e-5 of the output's largest value
# (near-zero entries are sums of cancelling terms, reordered differently by XLA and torch).
RTOL = 1e-5


def assert_close(actual, expected):
    expected = np.asarray(expected)
    atol = RTOL * float(np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=RTOL, atol=atol)


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


def _check_unet(model, params, torch_unet):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    timesteps = np.array([10, 500], np.int32)
    context = rng.standard_normal((2, MAX_LENGTH, TEXT_HIDDEN), dtype=np.float32)
    flax_out = jax.jit(model.predict_noise)(params["unet"], latents, timesteps, context)
    with torch.no_grad():
        torch_out = torch_unet(
            torch.from_numpy(latents), torch.from_numpy(timesteps), torch.from_numpy(context)
        ).sample
    assert_close(flax_out, torch_out.numpy())


def _check_text(model, params, torch_text):
    ids = model.tokenize(["a red circle in the style of painting", "two blue squares"])
    flax_out = jax.jit(model.encode_text)(params["text_encoder"], ids)
    with torch.no_grad():
        torch_out = torch_text(input_ids=torch.from_numpy(ids).long()).last_hidden_state
    assert_close(flax_out, torch_out.numpy())


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
    mean = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode).mean)
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))
    latents = np.random.default_rng(2).standard_normal((1, 4, 16, 16), dtype=np.float32)
    posterior_mean, decoded = mean(params["vae"], pixels), decode(params["vae"], latents)
    with torch.no_grad():
        torch_mean = torch_models["vae"].encode(torch.from_numpy(pixels)).latent_dist.mean
        torch_decoded = torch_models["vae"].decode(torch.from_numpy(latents)).sample
    assert_close(posterior_mean, torch_mean.numpy())
    assert_close(decoded, torch_decoded.numpy())


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
    loaded = weights.load_component_params(
        str(tmp_path / "text"), "text_encoder", shapes["text_encoder"], jnp.float32
    )
    # The buffer is dropped; every parameter is as loaded from the folder without it.
    reference = weights.load_component_params(
        os.path.join(root, "text_encoder"), "text_encoder", shapes["text_encoder"], jnp.float32
    )
    assert jax.tree.structure(loaded) == jax.tree.structure(reference)
    jax.tree.map(np.testing.assert_array_equal, loaded, reference)

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
    config["resnet_time_scale_shift"] = "scale_shift"  # A UNet variant we do not build.
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
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


# ---------------------------------------------------------------------------------------
# transformers 5's layout, PyTorch .bin files and weight variants.


def _load(root, **overrides):
    config = _model_config(root)
    config.update(overrides)
    return weights.load_pretrained(config)


PROMPTS = [
    "a red circle in the style of painting",
    "Two BLUE squares, big!",
    "zebra’s café  at 3pm #style <|endoftext|>",
]


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_transformers5_layout_loads_like_transformers4(version, tmp_path, request):
    root, _ = request.getfixturevalue(version)  # The same weights, transformers 4's layout.
    sd2 = version == "sd2"
    t5_root = str(tmp_path / "t5")
    torch_models = sd_folders.write_pipeline(t5_root, sd2=sd2, layout="transformers5")
    assert sorted(os.listdir(os.path.join(t5_root, "tokenizer"))) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    t5_keys = load_file(os.path.join(t5_root, "text_encoder", "model.safetensors"))
    assert "final_layer_norm.weight" in t5_keys

    model, params = _load(t5_root)
    reference_model, reference = _load(root)
    jax.tree.map(np.testing.assert_array_equal, params, reference)
    tokenizer = model.tokenizer
    assert isinstance(tokenizer, transformers.CLIPTokenizer)  # The slow class, as before.
    assert tokenizer.model_max_length == MAX_LENGTH
    assert tokenizer.pad_token == ("!" if sd2 else "<|endoftext|>")
    np.testing.assert_array_equal(model.tokenize(PROMPTS), reference_model.tokenize(PROMPTS))
    fast = torch_models["tokenizer"]  # The tokenizer.json itself, read by `tokenizers`.
    np.testing.assert_array_equal(
        model.tokenize(PROMPTS),
        fast(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids,
    )
    _check_text(model, params, torch_models["text_encoder"])


def test_tokenizer_json_merges_as_strings_and_added_tokens(tmp_path):
    sd_folders.write_pipeline(str(tmp_path), layout="transformers5")
    path = tmp_path / "tokenizer" / "tokenizer.json"
    data = json.loads(path.read_text())
    reference = clip_tokenizer.load(str(tmp_path / "tokenizer"))
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    placeholder = {"id": len(reference), "content": "<s*>", "special": False}
    data["added_tokens"].append(placeholder)
    path.write_text(json.dumps(data))
    tokenizer = clip_tokenizer.load(str(tmp_path / "tokenizer"))
    assert tokenizer.convert_tokens_to_ids("<s*>") == len(reference)
    assert tokenizer("a painting")["input_ids"] == reference("a painting")["input_ids"]

    placeholder["id"] += 1  # A gap in the ids: refused, not renumbered.
    path.write_text(json.dumps(data))
    with pytest.raises(errors.ConfigError, match=r"<s\*>.*has id"):
        clip_tokenizer.load(str(tmp_path / "tokenizer"))
    with pytest.raises(errors.NotFound, match="tokenizer.json"):
        clip_tokenizer.load(str(tmp_path))


def test_transformers5_mismatch_names_the_files_keys(tmp_path, sd1_shapes):
    sd_folders.write_pipeline(str(tmp_path), layout="transformers5")
    path = tmp_path / "text_encoder" / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["final_layer_norm.weight"]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"missing final_layer_norm\.weight \(1\)$"):
        weights.load_component_params(
            str(tmp_path / "text_encoder"), "text_encoder", sd1_shapes["text_encoder"], jnp.float32
        )


def test_bin_files_load_without_torch_equal_to_safetensors(sd1, tmp_path, monkeypatch):
    root, _ = sd1
    bin_root = str(tmp_path / "bin")
    torch_models = sd_folders.write_pipeline(bin_root, safe_serialization=False)
    assert os.path.isfile(os.path.join(bin_root, "unet", "diffusion_pytorch_model.bin"))
    # The text encoder sharded, as big hub checkpoints are: an index naming the shards.
    text_dir = os.path.join(bin_root, "text_encoder")
    os.remove(os.path.join(text_dir, "pytorch_model.bin"))
    state = {f"text_model.{k}": v for k, v in torch_models["text_encoder"].state_dict().items()}
    sd_folders.save_bin_shards(state, text_dir, shards=3)
    fmt, files = weights.find_weights(os.path.join(bin_root, "text_encoder"), "text_encoder")
    assert fmt == "bin" and len(files) > 1
    shapes = weights.param_shapes(
        weights.load_modules(bin_root, _model_config(bin_root)), jnp.float32
    )
    monkeypatch.setitem(sys.modules, "torch", None)  # Any `import torch` now fails.
    loaded = {
        c: weights.load_component_params(os.path.join(bin_root, c), c, shapes[c], jnp.float32)
        for c in weights.COMPONENTS
    }
    monkeypatch.undo()  # transformers' config classes import torch where it is installed.
    _, reference = _load(root)
    jax.tree.map(np.testing.assert_array_equal, loaded, reference)


def test_fp16_variants_load_from_safetensors_and_bin(sd1, tmp_path):
    root, _ = sd1
    _, reference = _load(root)
    half = jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), reference)
    for safe in (True, False):
        variant_root = str(tmp_path / f"fp16-{safe}")
        sd_folders.write_pipeline(variant_root, safe_serialization=safe, variant="fp16")
        name = "diffusion_pytorch_model.fp16." + ("safetensors" if safe else "bin")
        assert os.path.isfile(os.path.join(variant_root, "unet", name))
        _, loaded = _load(variant_root, variant="fp16")
        jax.tree.map(np.testing.assert_array_equal, loaded, half)
    with pytest.raises(errors.NotFound, match=r"diffusion_pytorch_model\.safetensors, "):
        _load(variant_root)  # No plain files: an error, not the fp16 ones.


def test_safetensors_are_read_before_bin(sd1, tmp_path):
    root, _ = sd1
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    torch.save({"garbage": torch.zeros(1)}, copy / "unet" / "diffusion_pytorch_model.bin")
    fmt, files = weights.find_weights(str(copy / "unet"), "unet")
    assert fmt == "safetensors"
    assert files == [str(copy / "unet" / "diffusion_pytorch_model.safetensors")]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "pytorch_model.bin")
    torch.save({"weight": torch.zeros(2), "payload": _Exploit(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"pytorch_model\.bin: refusing .*system"):
        torch_pickle.TorchFile(path)
    assert not marker.exists()
    torch.save({"weight": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(pickle.UnpicklingError, match="not a zip-format"):
        torch_pickle.TorchFile(path)


def test_torch_pickle_reads_views_dtypes_and_parameters(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "transposed": base.t(),  # Strided: shares the storage of `base`.
        "sliced": base[1:3, 2:],
        "base": base,
        "half": torch.randn(3, 2).half(),
        "bf16": torch.randn(5).bfloat16(),
        "long": torch.arange(4),
        "bool": torch.tensor([True, False]),
        "parameter": torch.nn.Parameter(torch.ones(2, 2)),
        "nested": {"inner": torch.zeros(1)},
    }
    path = str(tmp_path / "state.bin")
    torch.save(state, path)
    with torch_pickle.TorchFile(path) as f:
        assert f.shapes()["transposed"] == (6, 4)
        for key in ("transposed", "sliced", "base", "half", "long", "bool"):
            np.testing.assert_array_equal(f.read(key), state[key].numpy())
            assert f.read(key).dtype == state[key].numpy().dtype
        np.testing.assert_array_equal(
            f.read("bf16").astype(np.float32), state["bf16"].float().numpy()
        )
        np.testing.assert_array_equal(f.read("parameter"), np.ones((2, 2), np.float32))
        np.testing.assert_array_equal(f.read("nested.inner"), np.zeros(1, np.float32))


# ---------------------------------------------------------------------------------------
# Paths, hub ids and resolution.


def test_mistyped_relative_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("models/sd-tine")
    with pytest.raises(errors.NotFound, match=f"no folder {tmp_path}/models/sd-tiny .*exists"):
        weights.resolve_pretrained(_model_config("models/sd-tiny"))
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest.py: the hub says "not found".
    with pytest.raises(FileNotFoundError) as info:
        weights.resolve_pretrained(_model_config("owner/sd-tiny"))
    message = str(info.value)
    assert f"tried the folder {tmp_path}/owner/sd-tiny (none there) and the hub id " in message
    assert "\n" not in message


def test_hub_bin_only_components_are_fetched_as_bin(tmp_path, monkeypatch):
    root = str(tmp_path / "repo")
    sd_folders.write_pipeline(root, safe_serialization=False, variant="fp16")
    calls = []

    def fake_snapshot_download(repo_id, revision, allow_patterns):
        calls.append(allow_patterns)
        return root

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    config = _model_config("org/model")
    config.variant = "fp16"
    assert weights.resolve_pretrained(config) == root
    assert len(calls) == 2  # safetensors (none), then .bin (all): no msgpack fetch.
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in calls[0]
    assert "tokenizer/*" in calls[0]
    assert "text_encoder/pytorch_model.fp16.bin" in calls[1]
    assert "text_encoder/pytorch_model.bin.index.fp16.json" in calls[1]
    assert "text_encoder/pytorch_model.fp16-*-of-*.bin" in calls[1]
    assert not any(p.endswith((".safetensors", ".msgpack")) for p in calls[1])


def test_resolution_the_model_cannot_divide_is_refused_before_loading(sd1):
    root, _ = sd1
    config = _model_config(root)
    config.resolution = 62  # VAE halves once, UNet once: multiples of 4.
    with pytest.raises(errors.ConfigError, match=r"model.resolution=62 .*of 4.* 60 or 64"):
        weights.load_modules(root, config)
