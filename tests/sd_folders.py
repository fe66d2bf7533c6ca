"""Tiny pretrained Stable Diffusion folders, written by PyTorch diffusers and transformers.

`write_pipeline(root)` saves a random-init UNet, VAE, CLIP text encoder, tokenizer and
scheduler the way `StableDiffusionPipeline.save_pretrained` lays them out, shaped like the
tiny model `configs/demo.py` builds, so a test can load it as `model.source="pretrained"`
(resolution 32) and compare with the returned PyTorch modules. Tests import it as
`import sd_folders` (pytest puts `tests/` on `sys.path`).

Layouts: `"transformers4"` is what transformers 4 writes (tokenizer `vocab.json` +
`merges.txt`, text encoder keys `text_model.*`); `"transformers5"` what transformers 5
writes (tokenizer `tokenizer.json` only, text encoder keys without `text_model.`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Any

import diffusers
import torch
import transformers
from safetensors.torch import load_file, save_file

from nsync_jax import models

MAX_LENGTH = 16
TEXT_HIDDEN = 32
LAYOUTS = ("transformers4", "transformers5")


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values in every parameter, norms included, so no mapping hides behind 0/1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return module.eval()


def _write_tokenizer(directory: str, *, sd2: bool, layout: str) -> None:
    """The tiny CLIP tokenizer; SD 2's pads with "!", SD 1's with `<|endoftext|>`."""
    models.write_tiny_tokenizer(directory, MAX_LENGTH)
    config_path = os.path.join(directory, "tokenizer_config.json")
    if sd2:
        with open(config_path) as f:
            config = json.load(f)
        with open(config_path, "w") as f:
            json.dump({**config, "pad_token": "!"}, f)
    if layout == "transformers5":
        # transformers 5 writes the fast tokenizer's file and a config naming the tokens.
        fast = transformers.CLIPTokenizerFast.from_pretrained(directory)
        fast.save_pretrained(directory)
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            if os.path.exists(os.path.join(directory, name)):  # transformers 4 wrote them.
                os.remove(os.path.join(directory, name))
        with open(config_path) as f:
            config = json.load(f)
        config["tokenizer_class"] = "CLIPTokenizer"
        config["do_lower_case"] = True
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)


def _rewrite_text_encoder(
    directory: str, *, prefixed: bool, safe_serialization: bool, variant: str | None
) -> None:
    """Writes the text encoder's weights in one layout: keys with or without `text_model.`
    (transformers 4 / 5), as safetensors or a PyTorch pickle `.bin` (transformers 4)."""
    tensors = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(".safetensors"):
            tensors.update(load_file(path))
        elif name.endswith(".bin"):
            tensors.update(torch.load(path, weights_only=True))
        else:
            continue
        os.remove(path)
    renamed = {}
    for key, value in tensors.items():
        key = key.removeprefix("text_model.")
        renamed[f"text_model.{key}" if prefixed else key] = value
    stem = "model" if safe_serialization else "pytorch_model"
    ext = "safetensors" if safe_serialization else "bin"
    name = f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}"
    if safe_serialization:
        save_file(renamed, os.path.join(directory, name), metadata={"format": "pt"})
    else:
        torch.save(renamed, os.path.join(directory, name))


def write_pipeline(
    root: str,
    *,
    sd2: bool = False,
    layout: str = "transformers4",
    safe_serialization: bool = True,
    variant: str | None = None,
) -> dict[str, Any]:
    """Writes a tiny SD1-like or SD2-like diffusers folder at `root`.

    Args:
      root: the folder to write (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
        `scheduler/`, `model_index.json`).
      sd2: SD2-like (linear `proj_in`, v-prediction, per-block head dims, GELU text MLP,
        pad token "!") instead of SD1-like (conv `proj_in`, ε, quick GELU).
      layout: "transformers4" or "transformers5" (see the module docstring).
      safe_serialization: `.safetensors` if True, PyTorch pickle `.bin` if False.
      variant: e.g. "fp16" for `*.fp16.safetensors` / `*.fp16.bin`; "fp16" files hold
        float16 tensors, as the hub's do (the returned modules stay float32).

    Returns:
      The float32 PyTorch modules `{"unet", "vae", "text_encoder"}` and the `tokenizer`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    if layout == "transformers5" and not safe_serialization:
        raise ValueError("transformers 5 writes safetensors only")
    tokenizer_dir = os.path.join(root, "tokenizer")
    _write_tokenizer(tokenizer_dir, sd2=sd2, layout="transformers4")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        norm_num_groups=32,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        upcast_attention=sd2,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            hidden_act="gelu" if sd2 else "quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    seed = 1 if sd2 else 0
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    for i, module in enumerate(modules.values()):
        randomize(module, seed * 10 + i)
    if sd2:
        scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction")
    else:
        scheduler = diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    saved = {k: copy.deepcopy(m).half() if variant == "fp16" else m for k, m in modules.items()}
    # What a user's checkpoint is: the pipeline's own save_pretrained, model_index.json and all.
    diffusers.StableDiffusionPipeline(
        **saved,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(root, safe_serialization=safe_serialization, variant=variant)
    # The installed transformers wrote its own layout; lay the tokenizer and text encoder
    # out as the requested version writes them.
    shutil.rmtree(tokenizer_dir)
    _write_tokenizer(tokenizer_dir, sd2=sd2, layout=layout)
    _rewrite_text_encoder(
        os.path.join(root, "text_encoder"),
        prefixed=layout == "transformers4",
        safe_serialization=safe_serialization,
        variant=variant,
    )
    return {**modules, "tokenizer": tokenizer}


def save_bin_shards(state_dict: dict[str, torch.Tensor], directory: str, shards: int) -> None:
    """Writes `state_dict` as `shards` PyTorch pickles and the index naming them, the way
    transformers 4 saved big text encoders (transformers 5 writes no `.bin`)."""
    os.makedirs(directory, exist_ok=True)
    keys = sorted(state_dict)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state_dict[k] for k in keys[i::shards]}
        torch.save(part, os.path.join(directory, name))
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def tiny_clip(directory) -> str:
    """A tiny CLIP vision model saved by transformers at `directory`: the stand-in for the
    evaluation's CLIP weights (`eval.cmmd_weights`)."""
    torch.manual_seed(0)
    transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
            projection_dim=8,
        )
    ).save_pretrained(directory)
    return str(directory)
