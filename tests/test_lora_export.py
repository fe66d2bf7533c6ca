"""Exported LoRA files load in PyTorch diffusers with every key matched and equal outputs."""

import json
import os

import diffusers
import jax
import numpy as np
import peft
import pytest
import torch
from safetensors import safe_open

from configs import demo
from nsync_jax import export, lora, lora_export, torch_files
from nsync_jax import scope as scope_lib

# fp32; the LoRA delta adds one more reordered sum per adapted layer than plain parity.
RTOL = 2e-5
PROMPTS = ["a red circle in the style of <s*>", "two blue squares"]
RANK, ALPHA = 4, 6.0  # alpha != rank, so a lost alpha shows in the outputs.


def assert_close(actual, expected):
    expected = np.asarray(expected)
    atol = RTOL * float(np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=RTOL, atol=atol)


@pytest.fixture(scope="module")
def trained(tiny_sd, tmp_path_factory):
    """A tiny base pipeline on disk, and a pivotal-tuned LoRA on every target group."""
    config = demo.get_config()
    model, params = tiny_sd
    base = str(tmp_path_factory.mktemp("lora") / "base")
    export.export_pipeline(model, params, base, scope=scope_lib.UnetScope())
    config.train.scope = "lora_ti"
    config.lora.rank, config.lora.alpha = RANK, ALPHA
    config.lora.unet_targets = "attention,proj,ff,resnet"
    config.lora.text_targets = "text_attention"
    scope, model, params = scope_lib.make_scope(config.train, model, params, config.lora)
    trainable, frozen = scope.split(params)
    rng = np.random.default_rng(0)  # As if trained: B nonzero, everything moved.
    trainable = jax.tree.map(
        lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype), trainable
    )
    merged = scope.merged_params(trainable, frozen)
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, *model.latent_shape), dtype=np.float32)
    timesteps = np.array([3, 700], np.int32)
    ids = model.tokenize(PROMPTS)
    context = jax.jit(model.encode_text)(merged["text_encoder"], ids)
    noise = jax.jit(model.predict_noise)(merged["unet"], latents, timesteps, context)
    reference = {
        "latents": latents,
        "timesteps": timesteps,
        "context": np.asarray(context),
        "noise": np.asarray(noise),
    }
    return base, model, scope, trainable, frozen, reference


def _torch_outputs(pipe, reference):
    ids = pipe.tokenizer(
        PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length
    ).input_ids
    with torch.no_grad():
        context = pipe.text_encoder(torch.tensor(ids)).last_hidden_state
        noise = pipe.unet(
            torch.from_numpy(reference["latents"]),
            torch.from_numpy(reference["timesteps"]),
            context,
        ).sample
    return context.numpy(), noise.numpy()


def _expected(trainable, fold_alpha):
    """The PEFT state dict the loaded model must hold, per component."""
    expected = {"unet": {}, "text_encoder": {}}
    for component, name, a, b in lora_export.adapter_layers(trainable["lora"]):
        # The installed transformers' module names (transformers 5: no `text_model.`).
        name = name.removeprefix("text_model.")
        expected[component][f"{name}.lora_A.weight"] = a
        expected[component][f"{name}.lora_B.weight"] = b * (ALPHA / RANK if fold_alpha else 1)
    return expected


@pytest.mark.parametrize("layout,fold_alpha", [("peft", False), ("peft", True), ("kohya", False)])
def test_lora_loads_in_diffusers_with_equal_outputs(trained, tmp_path, layout, fold_alpha):
    base, model, scope, trainable, _, reference = trained
    output = lora_export.export_lora(
        model, scope, trainable, str(tmp_path), layout=layout, fold_alpha=fold_alpha
    )
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(output, weight_name=lora_export.LORA_FILE)  # Offline: named.
    pipe.load_textual_inversion(output)
    assert pipe.tokenizer.convert_tokens_to_ids("<s*>") == scope.token_id
    # The same two files as a textual-inversion export: one writer.
    with open(os.path.join(output, torch_files.EMBEDS_INFO_FILE)) as f:
        assert json.load(f)["placeholder_token"] == "<s*>"

    # No unmatched key: what PEFT holds is exactly what we wrote, tensor for tensor.
    adapters = pipe.get_list_adapters()
    for component, tensors in _expected(trainable, fold_alpha).items():
        (adapter,) = adapters[component]
        loaded = peft.get_peft_model_state_dict(getattr(pipe, component), adapter_name=adapter)
        assert sorted(loaded) == sorted(tensors), component
        for key, value in tensors.items():
            np.testing.assert_allclose(loaded[key].numpy(), value, rtol=1e-6, err_msg=key)
        config = getattr(pipe, component).peft_config[adapter]
        assert config.r == RANK and config.lora_alpha == (RANK if fold_alpha else ALPHA)

    context, noise = _torch_outputs(pipe, reference)
    assert_close(context, reference["context"])
    assert_close(noise, reference["noise"])


def test_layout_keys_and_alpha(trained, tmp_path):
    _, model, scope, trainable, _, _ = trained
    peft_file = lora_export.save_lora_weights(
        trainable["lora"], scope.settings, str(tmp_path / "peft")
    )
    with safe_open(peft_file, framework="np") as f:
        keys, metadata = set(f.keys()), f.metadata()
        conv_a = f.get_tensor("unet.down_blocks.1.resnets.0.conv_shortcut.lora_A.weight")
        conv_b = f.get_tensor("unet.down_blocks.1.resnets.0.conv_shortcut.lora_B.weight")
        res_a = f.get_tensor("unet.mid_block.resnets.0.conv1.lora_A.weight")
    assert conv_a.shape == (RANK, 32, 1, 1) and conv_b.shape == (64, RANK, 1, 1)
    assert res_a.shape == (RANK, 64, 3, 3)
    assert "text_encoder.encoder.layers.1.self_attn.q_proj.lora_B.weight" in keys
    assert not any(k.endswith(".alpha") for k in keys)
    config = json.loads(metadata[lora_export.METADATA_KEY])
    assert config["unet.lora_alpha"] == ALPHA and config["text_encoder.r"] == RANK
    assert len(config["unet.target_modules"]) * 2 == sum(k.startswith("unet.") for k in keys)

    kohya_file = lora_export.save_lora_weights(
        trainable["lora"], scope.settings, str(tmp_path / "kohya"), layout="kohya"
    )
    with safe_open(kohya_file, framework="np") as f:
        stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
        assert f.get_tensor(f"{stem}.alpha") == np.float32(ALPHA)
        assert f.get_tensor(f"{stem}.lora_up.weight").shape == (32, RANK)
        assert "lora_te_text_model_encoder_layers_0_self_attn_out_proj.lora_down.weight" in f.keys()
    with pytest.raises(ValueError, match="fold_alpha"):
        lora_export.save_lora_weights(
            trainable["lora"], scope.settings, str(tmp_path / "x"), layout="kohya", fold_alpha=True
        )
    with pytest.raises(ValueError, match="export_layout"):
        lora_export.save_lora_weights(
            trainable["lora"], scope.settings, str(tmp_path / "x"), layout="a1111"
        )


def test_merged_pipeline_export(trained, tmp_path):
    base, model, scope, trainable, frozen, reference = trained
    with pytest.raises(ValueError, match="merged_params"):
        attached = lora.apply_adapters(
            frozen,
            trainable["lora"],
            lora.LoraSettings(RANK, ALPHA, scope.settings.targets, "gaussian", "intercept"),
        )
        export.export_pipeline(model, attached, str(tmp_path / "bad"), scope=scope)
    output = export.export_pipeline(
        model,
        scope.merged_params(trainable, frozen),
        str(tmp_path / "merged"),
        scope=scope,
        base_dir=base,
    )
    # The VAE is the base's; UNet and text encoder carry the LoRA, the token is separate.
    assert not os.path.exists(os.path.join(output, lora_export.LORA_FILE))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(output)
    assert len(pipe.tokenizer) == scope.token_id
    pipe.load_textual_inversion(output)
    context, noise = _torch_outputs(pipe, reference)
    assert_close(context, reference["context"])
    assert_close(noise, reference["noise"])
