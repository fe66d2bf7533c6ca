"""CLIP ViT image embedders for the CSD style score and CMMD.

Both are our CLIP vision tower with a bias-free linear head on the post-LayerNorm class
token (`models.clip.CLIPVisionModelWithProjection`), and an L2 normalisation:

  * CMMD (Jayasumana et al. 2024): CLIP ViT-L/14-336; the head is CLIP's
    `visual_projection`, loaded from a Hugging Face folder (`model.safetensors`,
    `pytorch_model.bin` or `flax_model.msgpack`).
  * CSD (Somepalli et al. 2024): a CLIP ViT-L/14 (224 px) backbone fine-tuned for style,
    plus the style head `last_layer_style`. The released checkpoint is a torch pickle
    whose `model_state_dict` uses OpenAI CLIP's `VisualTransformer` names under
    `module.backbone.`. CSD sets `backbone.proj = None`, so the backbone returns
    `ln_post(x[:, 0])` (1024-d for ViT-L) and the style embedding is
    `normalize(feature @ last_layer_style)` with `last_layer_style` of shape (1024, 768),
    a copy of CLIP's `proj` at initialisation. So the head here is `last_layer_style`
    used as `x @ W`; any `proj` in the file is ignored, and the content head
    (`last_layer_content`) is not used.

Parameters are `{"vision_model": <CLIPVisionTransformer params>, "visual_projection":
{"kernel": (hidden, dim)}}`, the layout of transformers' former Flax `CLIPModel`, so an HF
msgpack maps one to one; the head's width is the config's `projection_dim`. Inputs are NHWC,
already normalised with CLIP's mean/std.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nsync_jax.evaluation import weights
from nsync_jax.models import clip


class ClipImageEncoder(clip.CLIPVisionModelWithProjection):
    """CLIP vision tower + bias-free projection -> L2-normalised (batch, projection_dim)."""

    def __call__(self, pixels: jax.Array) -> jax.Array:
        embedding = super().__call__(pixels).image_embeds
        return embedding / jnp.linalg.norm(embedding, axis=-1, keepdims=True)

    @property
    def projection_dim(self) -> int:
        return self.config.projection_dim


def param_shapes(encoder: ClipImageEncoder) -> Any:
    return jax.eval_shape(encoder.init_weights, jax.random.key(0))


def init_params(encoder: ClipImageEncoder, rng: jax.Array) -> Any:
    """Random parameters (tests only: metrics never run on random weights)."""
    return jax.jit(encoder.init_weights)(rng)


# --- Hugging Face CLIP (CMMD) ------------------------------------------------------------


def hf_torch_source(name: str) -> weights.Source:
    """PyTorch-named HF CLIP array (`model.safetensors`) for a Flax leaf path."""
    parts = name.split("/")
    module, leaf = ".".join(parts[:-1]), parts[-1]
    if leaf == "class_embedding":
        return ".".join(parts), lambda w: w
    if leaf == "kernel" and "patch_embedding" in parts:
        return f"{module}.weight", lambda w: np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO
    if leaf == "kernel":
        return f"{module}.weight", lambda w: np.transpose(w)
    if leaf in ("scale", "embedding"):
        return f"{module}.weight", lambda w: w
    return f"{module}.{leaf}", lambda w: w


def hf_flax_source(name: str) -> weights.Source:
    """Flax-named HF CLIP array (`flax_model.msgpack`) for a Flax leaf path."""
    return name.replace("/", "."), lambda w: w


def hf_vision_config(config: dict[str, Any]) -> clip.CLIPVisionConfig:
    """The vision config, projection width included, of an HF `config.json` (CLIP or
    vision)."""
    if "vision_config" in config:  # A full CLIPModel folder: the projection width is top-level.
        vision = clip.CLIPVisionConfig.from_dict(config["vision_config"])
        width = int(config.get("projection_dim", vision.projection_dim))
        return dataclasses.replace(vision, projection_dim=width)
    return clip.CLIPVisionConfig.from_dict(config)


def load_hf(path: str, metric: str = "cmmd") -> tuple[ClipImageEncoder, Any]:
    """CLIP vision tower + `visual_projection` from a Hugging Face folder."""
    config, flat = weights.read_hf_folder(path, metric)
    encoder = ClipImageEncoder(hf_vision_config(config))
    flax_named = any(k.endswith(".kernel") for k in flat)
    source = hf_flax_source if flax_named else hf_torch_source
    return encoder, weights.assign(param_shapes(encoder), flat, source, metric, path)


# --- OpenAI CLIP layout (CSD) --------------------------------------------------------------

_OPENAI_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "fc1": "mlp.c_fc",
    "fc2": "mlp.c_proj",
    "out_proj": "attn.out_proj",
}
_QKV = ("q_proj", "k_proj", "v_proj")


def openai_source(
    name: str, backbone: str = "backbone.", head: str = "last_layer_style"
) -> weights.Source:
    """OpenAI `VisualTransformer` array for a Flax leaf path (CSD: backbone + style head).

    The fused attention `in_proj_weight` (3·width, width) holds q, k, v stacked in that
    order; each slice is a torch Linear weight, transposed to a Flax kernel. `head` is
    used as `x @ W` (no transpose).
    """
    parts = name.split("/")
    leaf = parts[-1]
    torch_leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    linear = (lambda w: np.transpose(w)) if leaf == "kernel" else (lambda w: w)
    if parts[0] == "visual_projection":
        return head, lambda w: w
    sub = parts[1:]
    if sub == ["embeddings", "class_embedding"]:
        return backbone + "class_embedding", lambda w: w
    if sub == ["embeddings", "patch_embedding", "kernel"]:
        return backbone + "conv1.weight", lambda w: np.transpose(w, (2, 3, 1, 0))
    if sub == ["embeddings", "position_embedding", "embedding"]:
        return backbone + "positional_embedding", lambda w: w
    if sub[0] in ("pre_layrnorm", "post_layernorm"):
        ln = "ln_pre" if sub[0] == "pre_layrnorm" else "ln_post"
        return f"{backbone}{ln}.{torch_leaf}", lambda w: w
    if sub[:2] == ["encoder", "layers"]:
        block = f"{backbone}transformer.resblocks.{sub[2]}."
        module = sub[-2]
        if module in _QKV:
            i = _QKV.index(module)
            fused = f"{block}attn.in_proj_{torch_leaf}"

            def qkv(w, i=i):
                width = w.shape[0] // 3
                return linear(w[i * width : (i + 1) * width])

            return fused, qkv
        return f"{block}{_OPENAI_LAYER[module]}.{torch_leaf}", linear
    raise weights.WeightsError(f"no OpenAI CLIP name for parameter {name}")


def openai_vision_config(
    flat: weights.Flat,
    metric: str,
    path: str,
    backbone: str = "backbone.",
    head: str = "last_layer_style",
    num_heads: int | None = None,
) -> clip.CLIPVisionConfig:
    """Vision config inferred from OpenAI-layout shapes (heads = width // 64, as OpenAI);
    `projection_dim` is the head's width."""
    for key in (backbone + "conv1.weight", backbone + "positional_embedding", head):
        if key not in flat:
            raise weights.WeightsError(f"{metric}: {path!r} has no array {key!r}")
    width, _, patch, _ = flat[backbone + "conv1.weight"].shape
    grid = math.isqrt(flat[backbone + "positional_embedding"].shape[0] - 1)
    block = re.compile(re.escape(backbone) + r"transformer\.resblocks\.(\d+)\.")
    layers = {int(m.group(1)) for k in flat if (m := block.match(k))}
    fc = backbone + "transformer.resblocks.0.mlp.c_fc.weight"
    if not layers or fc not in flat:
        raise weights.WeightsError(f"{metric}: {path!r} has no array {fc!r}")
    return clip.CLIPVisionConfig(
        hidden_size=int(width),
        intermediate_size=int(flat[fc].shape[0]),
        num_hidden_layers=max(layers) + 1,
        num_attention_heads=num_heads or int(width) // 64,
        image_size=int(grid * patch),
        patch_size=int(patch),
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=int(flat[head].shape[1]),
    )


def csd_from_state_dict(
    flat: weights.Flat, path: str = "<state dict>", num_heads: int | None = None
) -> tuple[ClipImageEncoder, Any]:
    """CSD encoder and parameters from its (possibly `module.`-prefixed) state dict."""
    flat = weights.strip_prefix(flat, "module.")
    encoder = ClipImageEncoder(openai_vision_config(flat, "csd", path, num_heads=num_heads))
    return encoder, weights.assign(param_shapes(encoder), flat, openai_source, "csd", path)


def load_csd(path: str, num_heads: int | None = None) -> tuple[ClipImageEncoder, Any]:
    """CSD from its torch checkpoint or a .safetensors/.npz with the same names."""
    return csd_from_state_dict(weights.read_file(path, "csd"), path, num_heads)
