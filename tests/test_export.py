"""Exported pipelines load in PyTorch diffusers with every key matched and equal outputs."""

import filecmp
import os

import diffusers
import jax
import numpy as np
import pytest
import sd_folders
import torch
import transformers
from safetensors.numpy import load_file

from configs import demo
from nsync_jax import errors, export, runs, torch_files, weights
from nsync_jax import scope as scope_lib

RTOL = 1e-5  # fp32 parity; the absolute floor is 1e-5 of the reference's largest value.
PROMPT = "a red circle in the style of <s*>"


def _perturb(tree, seed):
    """As if trained: every leaf moves, so no name or layout mistake can hide."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), tree)


def assert_close(actual, expected):
    expected = np.asarray(expected)
    atol = RTOL * float(np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=RTOL, atol=atol)


def _train_config(scope):
    config = demo.get_config().train
    config.scope = scope
    return config


@pytest.fixture(scope="module")
def tiny():
    """The demo's tiny model, built from the key `train.setup` uses for the seed."""
    config = demo.get_config()
    init_rng, _ = jax.random.split(jax.random.key(config.seed))
    return runs.build_model(config.model, init_rng)


@pytest.fixture(scope="module")
def unet_export(tiny, tmp_path_factory):
    """A tiny model with every component perturbed, exported with the `unet` scope."""
    model, params = tiny
    scope, model, params = scope_lib.make_scope(_train_config("unet"), model, params)
    params = {name: _perturb(tree, i) for i, (name, tree) in enumerate(sorted(params.items()))}
    output = str(tmp_path_factory.mktemp("export") / "unet")
    export.export_pipeline(model, params, output, scope=scope)
    return output, model, params


def _load_checked(cls, directory):
    module, info = cls.from_pretrained(directory, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), (directory, kind, info[kind])
    return module.eval()


def _text_outputs(model, text_params, torch_text, torch_tokenizer):
    ids = model.tokenize([PROMPT, "two blue squares"])
    torch_ids = torch_tokenizer(
        [PROMPT, "two blue squares"],
        padding="max_length",
        max_length=torch_tokenizer.model_max_length,
        return_tensors="np",
    ).input_ids
    np.testing.assert_array_equal(ids, torch_ids)
    flax_out = jax.jit(model.encode_text)(text_params, ids)
    with torch.no_grad():
        torch_out = torch_text(input_ids=torch.from_numpy(torch_ids).long()).last_hidden_state
    return np.asarray(flax_out), torch_out.numpy()


def test_unet_export_loads_in_pytorch_with_equal_outputs(unet_export):
    output, model, params = unet_export
    unet = _load_checked(diffusers.UNet2DConditionModel, os.path.join(output, "unet"))
    vae = _load_checked(diffusers.AutoencoderKL, os.path.join(output, "vae"))
    text = _load_checked(transformers.CLIPTextModel, os.path.join(output, "text_encoder"))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(output)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.scheduler.config.prediction_type == model.prediction_type
    assert len(pipe.tokenizer) == len(model.tokenizer)

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, *model.latent_shape), dtype=np.float32)
    timesteps = np.array([3, 700], np.int32)
    context = rng.standard_normal((2, 77, 32), dtype=np.float32)
    flax_out = np.asarray(jax.jit(model.predict_noise)(params["unet"], latents, timesteps, context))
    inputs = (torch.from_numpy(latents), torch.from_numpy(timesteps), torch.from_numpy(context))
    with torch.no_grad():
        torch_out = unet(*inputs).sample.numpy()
    assert_close(flax_out, torch_out)

    flax_text, torch_text = _text_outputs(model, params["text_encoder"], text, pipe.tokenizer)
    assert_close(flax_text, torch_text)

    pixels = rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    mean = jax.jit(lambda p, x: model.vae.apply({"params": p}, x, method=model.vae.encode).mean)(
        params["vae"], pixels
    )
    decoded = jax.jit(model.decode_latents)(params["vae"], latents)
    with torch.no_grad():
        torch_mean = vae.encode(torch.from_numpy(pixels)).latent_dist.mean
        scaled = torch.from_numpy(latents) / vae.config.scaling_factor
        torch_decoded = vae.decode(scaled).sample
    assert_close(mean, torch_mean.numpy())
    assert_close(decoded, torch_decoded.numpy())


def test_export_round_trips_through_our_loader(unet_export):
    output, _, params = unet_export
    model_config = demo.get_config().model
    model_config.source, model_config.pretrained = "pretrained", output
    _, loaded = weights.load_pretrained(model_config)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def _check_textual_inversion(output, model, params, token_id):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(output)
    assert len(pipe.tokenizer) == token_id  # The base tokenizer, without the placeholder.
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == token_id
    pipe.load_textual_inversion(output)  # Token name from learned_embeds.safetensors.
    assert pipe.tokenizer.convert_tokens_to_ids("<s*>") == token_id
    flax_text, torch_text = _text_outputs(
        model, params["text_encoder"], pipe.text_encoder, pipe.tokenizer
    )
    assert_close(flax_text, torch_text)


def _trained_token(model, params):
    scope, model, params = scope_lib.make_scope(_train_config("textual_inversion"), model, params)
    trainable, frozen = scope.split(params)
    params = scope.merge(_perturb(trainable, 7), frozen)
    return scope, model, params


def test_textual_inversion_export_without_base(unet_export, tmp_path):
    _, model, params = unet_export
    scope, model, params = _trained_token(model, params)
    output = export.export_pipeline(model, params, str(tmp_path / "ti"), scope=scope)
    embeds = load_file(os.path.join(output, torch_files.EMBEDS_FILE))
    assert list(embeds) == ["<s*>"] and embeds["<s*>"].shape == (1, 32)
    _check_textual_inversion(output, model, params, scope.token_id)


def test_textual_inversion_export_copies_the_base(unet_export, tmp_path):
    base, model, params = unet_export
    scope, model, params = _trained_token(model, params)
    output = export.export_pipeline(model, params, str(tmp_path / "ti"), scope=scope, base_dir=base)
    for name in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
    ):
        assert filecmp.cmp(os.path.join(base, name), os.path.join(output, name), shallow=False)
    _check_textual_inversion(output, model, params, scope.token_id)


def test_unet_export_with_base_converts_only_the_unet(unet_export, tmp_path):
    base, model, params = unet_export
    params = {**params, "unet": _perturb(params["unet"], 11)}
    output = export.export_pipeline(
        model, params, str(tmp_path / "ft"), scope=scope_lib.UnetScope(), base_dir=base
    )
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert filecmp.cmp(os.path.join(base, vae), os.path.join(output, vae), shallow=False)
    unet = load_file(os.path.join(output, "unet", "diffusion_pytorch_model.safetensors"))
    kernel = params["unet"]["conv_in"]["kernel"]  # HWIO -> OIHW
    np.testing.assert_array_equal(unet["conv_in.weight"], np.transpose(kernel, (3, 2, 0, 1)))


def test_unet_text_encoder_export_converts_both_and_copies_the_vae(unet_export, tmp_path):
    base, model, params = unet_export
    params = {
        **params,
        "unet": _perturb(params["unet"], 12),
        "text_encoder": _perturb(params["text_encoder"], 13),
    }
    output = export.export_pipeline(
        model, params, str(tmp_path / "ft"), scope=scope_lib.UnetTextEncoderScope(), base_dir=base
    )
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert filecmp.cmp(os.path.join(base, vae), os.path.join(output, vae), shallow=False)
    unet = load_file(os.path.join(output, "unet", "diffusion_pytorch_model.safetensors"))
    kernel = params["unet"]["conv_in"]["kernel"]  # HWIO -> OIHW
    np.testing.assert_array_equal(unet["conv_in.weight"], np.transpose(kernel, (3, 2, 0, 1)))
    text = load_file(os.path.join(output, "text_encoder", "model.safetensors"))
    np.testing.assert_array_equal(
        text["text_model.embeddings.token_embedding.weight"],
        params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"],
    )


def test_key_check_names_the_tensor(unet_export):
    output, model, params = unet_export
    state = export.torch_state_dict(params["unet"])
    reference = export.torch_reference_shapes("unet", os.path.join(output, "unet"))
    export.check_torch_keys("unet", state, reference)
    del state["time_embedding.linear_1.weight"]
    state["time_embedding.linear.1.weight"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"missing time_embedding\.linear_1\.weight.*unexpected"):
        export.check_torch_keys("unet", state, reference)
    half = export.torch_state_dict(params["vae"], np.float16)
    assert {a.dtype for a in half.values()} == {np.dtype(np.float16)}
    with pytest.raises(errors.AlreadyExists, match="not empty"):
        export.export_pipeline(model, params, output, scope=scope_lib.UnetScope())


def test_export_run_restores_the_trained_params_of_a_checkpoint(tiny, tmp_path, save_run):
    config = demo.get_config()
    scope, model, params = scope_lib.make_scope(config.train, *tiny)
    trainable, frozen = scope.split(params)
    trainable = _perturb(trainable, 5)
    workdir = str(tmp_path / "run")
    save_run(workdir, config, trainable, frozen)

    output = export.export_run(workdir, str(tmp_path / "out"))
    unet = load_file(os.path.join(output, "unet", "diffusion_pytorch_model.safetensors"))
    np.testing.assert_array_equal(
        unet["conv_in.weight"], np.transpose(trainable["conv_in"]["kernel"], (3, 2, 0, 1))
    )
    other_seed = demo.get_config()
    other_seed.seed = 1  # Rebuilds different frozen (tiny, random) weights: refused.
    with pytest.raises(ValueError, match="frozen parameters differ"):
        export.export_run(workdir, str(tmp_path / "out2"), config=other_seed)


def test_export_run_writes_the_ema_unless_raw_weights_are_asked_for(tiny, tmp_path, save_run):
    config = demo.get_config()
    config.train.scope, config.train.ema_decay = "textual_inversion", 0.999
    scope, model, params = scope_lib.make_scope(config.train, *tiny)
    trainable, frozen = scope.split(params)
    ema = _perturb(trainable, 6)
    workdir = str(tmp_path / "run")
    save_run(workdir, config, trainable, frozen, ema=ema)

    def learned(output):
        return next(iter(load_file(os.path.join(output, torch_files.EMBEDS_FILE)).values()))

    default = export.export_run(workdir, str(tmp_path / "default"))
    np.testing.assert_array_equal(learned(default), ema["token_embedding"])
    raw = export.export_run(workdir, str(tmp_path / "raw"), ema=False)
    np.testing.assert_array_equal(learned(raw), trainable["token_embedding"])


def test_export_of_a_transformers5_base_loads_in_transformers4(tmp_path):
    """A base saved by transformers 5 (tokenizer.json, keys without `text_model.`) exports
    in the layout transformers 4 reads: its frozen text encoder and tokenizer are written,
    not copied."""
    base = str(tmp_path / "base")
    torch_models = sd_folders.write_pipeline(base, layout="transformers5")
    model_config = demo.get_config().model
    model_config.source, model_config.pretrained = "pretrained", base
    model, params = weights.load_pretrained(model_config)
    params = {**params, "unet": _perturb(params["unet"], 3)}
    output = export.export_pipeline(
        model, params, str(tmp_path / "out"), scope=scope_lib.UnetScope(), base_dir=base
    )
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(os.path.join(output, "tokenizer")))
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert filecmp.cmp(os.path.join(base, vae), os.path.join(output, vae), shallow=False)
    text_state = load_file(os.path.join(output, "text_encoder", "model.safetensors"))
    for key, value in torch_models["text_encoder"].state_dict().items():
        key = "text_model." + key.removeprefix("text_model.")  # Written with the prefix.
        np.testing.assert_array_equal(text_state[key], value.numpy())

    _load_checked(transformers.CLIPTextModel, os.path.join(output, "text_encoder"))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(output)
    assert pipe.tokenizer.model_max_length == sd_folders.MAX_LENGTH
    flax_text, torch_text = _text_outputs(
        model, params["text_encoder"], pipe.text_encoder, pipe.tokenizer
    )
    assert_close(flax_text, torch_text)
