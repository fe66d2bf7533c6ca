"""The style encoder: a CLIP ViT image tower, its pooled output, a linear map to n×D tokens.

    V = reshape(W · pooler_output(x) + b, (n, D))

`pooler_output` is the post-LayerNorm class token (1024-d for ViT-L/14; CLIP's visual
projection is not used); W maps it to n·D = 8·768 values for SD 1.x. The whole tower
trains with the projection (stages 2 and 3). `head="slice"` is the ablation without the
projection: the first n tokens of the tower's last hidden state, cut or zero-padded to D.

Input: NHWC pixels in [-1, 1] at the tower's `image_size` (the paper normalises with
mean = std = 0.5, i.e. the [-1, 1] the diffusion model reads, not CLIP's statistics);
`tower_inputs` resizes the training batch's NCHW pixels to that.

Parameters are `{"vision_model": <models.clip.CLIPVisionTransformer params>, "projection":
{"kernel", "bias"}}`: the tower in the layout of transformers' former Flax CLIP (as
`evaluation/clip_embed.py` holds it), so a Hugging Face CLIP or CLIPVisionModel folder
loads into it with the evaluation loaders, and `export_torch` writes it back as a
`CLIPVisionModel` folder plus `projection.safetensors` (torch `Linear` layout).
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nsync_jax import errors, torch_files
from nsync_jax.evaluation import clip_embed
from nsync_jax.evaluation import weights as eval_weights
from nsync_jax.models import clip, layers

HEADS = ("linear", "slice")
TOWER_SOURCES = ("tiny", "pretrained")
PROJECTION_FILE = "projection.safetensors"
ENCODER_INFO_FILE = "style_encoder.json"


class StyleEncoder(nn.Module):
    """CLIP vision tower → pooled output → linear projection → [B, n, D] style tokens.

    Attributes:
      vision_config: the tower's config.
      num_tokens: n, the style tokens.
      token_dim: D, the text encoder's width.
      head: "linear" (the method) or "slice" (the ablation without the projection).
    """

    vision_config: clip.CLIPVisionConfig
    num_tokens: int
    token_dim: int
    head: str = "linear"

    def setup(self):
        self.vision_model = clip.CLIPVisionTransformer(self.vision_config)
        if self.head == "linear":
            self.projection = layers.Dense(self.num_tokens * self.token_dim)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        tower = self.vision_model(pixels)
        if self.head == "linear":
            tokens = self.projection(tower.pooler_output)
            return tokens.reshape(pixels.shape[0], self.num_tokens, self.token_dim)
        tokens = tower.last_hidden_state[:, : self.num_tokens, : self.token_dim]
        return jnp.pad(tokens, ((0, 0), (0, 0), (0, self.token_dim - tokens.shape[-1])))


def tower_inputs(pixels_nchw: jax.Array, image_size: int) -> jax.Array:
    """A batch's NCHW pixels in [-1, 1] as the tower's NHWC input at `image_size`
    (antialiased linear resize when the sides differ)."""
    nhwc = jnp.transpose(pixels_nchw, (0, 2, 3, 1))
    if nhwc.shape[1] == image_size and nhwc.shape[2] == image_size:
        return nhwc
    shape = (nhwc.shape[0], image_size, image_size, nhwc.shape[3])
    return jax.image.resize(nhwc, shape, "linear", antialias=True)


def tiny_vision_config(tiny: ml_collections.ConfigDict) -> clip.CLIPVisionConfig:
    """A small random tower from `style.tiny_tower` (tests, the digits testbed)."""
    return clip.CLIPVisionConfig(
        hidden_size=tiny.hidden,
        intermediate_size=4 * tiny.hidden,
        num_hidden_layers=tiny.layers,
        num_attention_heads=tiny.heads,
        image_size=tiny.image_size,
        patch_size=tiny.patch_size,
        hidden_act="quick_gelu",
    )


def check_config(style: ml_collections.ConfigDict) -> None:
    """Rejects unknown names and impossible sizes of the `style` group."""
    if style.head not in HEADS:
        raise errors.ConfigError(f"style.head={style.head!r} is not one of {HEADS}")
    if style.tower not in TOWER_SOURCES:
        raise errors.ConfigError(f"style.tower={style.tower!r} is not one of {TOWER_SOURCES}")
    if style.tower == "pretrained" and not style.tower_path:
        raise errors.ConfigError(
            "style.tower='pretrained' needs style.tower_path: a Hugging Face CLIP or "
            "CLIPVisionModel folder (e.g. openai/clip-vit-large-patch14); nothing is downloaded"
        )
    if style.num_tokens < 1:
        raise errors.ConfigError(f"style.num_tokens must be >= 1, got {style.num_tokens}")


def _shapes(encoder: StyleEncoder) -> Any:
    size = encoder.vision_config.image_size
    return jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]


def load_tower(path: str) -> tuple[clip.CLIPVisionConfig, Any]:
    """(config, parameters) of the vision tower of a Hugging Face CLIP (`CLIPModel`) or
    `CLIPVisionModel` folder (safetensors, msgpack or .bin), e.g. CLIP ViT-L/14."""
    config, flat = eval_weights.read_hf_folder(path, "style_encoder")
    vision = clip_embed.hf_vision_config(config)
    shapes = jax.eval_shape(clip.CLIPVisionTransformer(vision).init_weights, jax.random.key(0))
    flax_named = any(k.endswith(".kernel") for k in flat)
    source = clip_embed.hf_flax_source if flax_named else clip_embed.hf_torch_source
    expected = {"vision_model": shapes}
    return vision, eval_weights.assign(expected, flat, source, "style_encoder", path)[
        "vision_model"
    ]


def build(
    style: ml_collections.ConfigDict, token_dim: int, rng: jax.Array
) -> tuple[StyleEncoder, Any]:
    """The encoder of `style` (`tower`: "tiny" random or "pretrained" from `tower_path`)
    and its initial parameters: the tower's weights and a random projection."""
    check_config(style)
    if style.tower == "pretrained":
        vision, tower_params = load_tower(style.tower_path)
    else:
        vision, tower_params = tiny_vision_config(style.tiny_tower), None
    encoder = StyleEncoder(vision, style.num_tokens, token_dim, style.head)
    size = vision.image_size
    params = jax.jit(encoder.init)(rng, jnp.zeros((1, size, size, 3)))["params"]
    params = jax.tree.map(jnp.asarray, dict(params))
    if tower_params is not None:
        params["vision_model"] = jax.tree.map(jnp.asarray, tower_params)
    return encoder, params


# --- PyTorch export ------------------------------------------------------------------------


def _torch_name(name: str) -> tuple[str, Any]:
    """The transformers PyTorch name of a Flax tower leaf and the inverse of the loader's
    transform (`clip_embed.hf_torch_source`)."""
    source, _ = clip_embed.hf_torch_source(name)
    leaf = name.split("/")[-1]
    if leaf == "kernel" and "patch_embedding" in name:
        return source, lambda w: np.transpose(w, (3, 2, 0, 1))  # HWIO -> OIHW
    if leaf == "kernel":
        return source, np.transpose
    return source, lambda w: w


def export_torch(output_dir: str, encoder: StyleEncoder, params: Any) -> dict[str, str]:
    """Writes the encoder for PyTorch users; returns the paths written.

    - `output_dir/vision/`: `config.json` and `model.safetensors` of transformers'
      `CLIPVisionModel` (`CLIPVisionModel.from_pretrained(output_dir + "/vision")`);
    - `output_dir/projection.safetensors`: `weight` [n·D, hidden] and `bias` [n·D] of a
      `torch.nn.Linear` (absent for `head="slice"`);
    - `output_dir/style_encoder.json`: n, D, head, the tower's image size and how to
      prepare its input.

    docs/style_encoder.md has the PyTorch snippet that reproduces `encoder.apply`.
    """
    from safetensors.numpy import save_file

    vision_dir = os.path.join(output_dir, "vision")
    os.makedirs(vision_dir, exist_ok=True)
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        {"vision_model": params["vision_model"]}
    )[0]:
        name = eval_weights.path_name(path)
        torch_name, inverse = _torch_name(name)
        flat[torch_name] = np.ascontiguousarray(inverse(torch_files.to_numpy(leaf)), np.float32)
    # transformers' CLIPVisionEmbeddings keeps position_ids as a buffer; it is not saved.
    save_file(flat, os.path.join(vision_dir, "model.safetensors"), metadata={"format": "pt"})
    config = encoder.vision_config.to_dict()  # architectures: ["CLIPVisionModel"]
    with open(os.path.join(vision_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    written = {"vision": vision_dir}
    if encoder.head == "linear":
        kernel = torch_files.to_numpy(params["projection"]["kernel"])
        bias = torch_files.to_numpy(params["projection"]["bias"])
        path = os.path.join(output_dir, PROJECTION_FILE)
        save_file(
            {
                "weight": np.ascontiguousarray(kernel.T, np.float32),
                "bias": np.ascontiguousarray(bias, np.float32),
            },
            path,
            metadata={"format": "pt"},
        )
        written["projection"] = path
    info = {
        "num_tokens": encoder.num_tokens,
        "token_dim": encoder.token_dim,
        "head": encoder.head,
        "image_size": encoder.vision_config.image_size,
        "input": "RGB resized to image_size, pixel / 127.5 - 1 (mean = std = 0.5), NCHW",
    }
    torch_files.write_json(os.path.join(output_dir, ENCODER_INFO_FILE), info)
    written["info"] = os.path.join(output_dir, ENCODER_INFO_FILE)
    return written
