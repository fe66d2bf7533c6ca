"""CLIP embedders against independent torch implementations with the same random weights.

CMMD: transformers' PyTorch `CLIPVisionModelWithProjection` / `CLIPModel` saved as an HF
folder. CSD: an OpenAI-layout `VisualTransformer` written here with
`nn.MultiheadAttention` blocks, wrapped as CSD wraps it, saved as CSD saves checkpoints.
"""

import argparse
import json
from collections import OrderedDict

import flax.serialization
import jax
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from nsync_jax.evaluation import clip_embed, images, weights

TINY_VISION = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=24,
    hidden_act="quick_gelu",
)


def _pixels(n, size, seed=0):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _flax_embed(encoder, params, pixels):
    return np.asarray(jax.jit(lambda p, x: encoder.apply({"params": p}, x))(params, pixels))


def _jitter_layer_norms(model):
    # Default LayerNorms are (1, 0): random ones catch a swapped scale/bias.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)


# --- CMMD: Hugging Face CLIP -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vision_with_projection", "clip_model"])
def test_cmmd_embedder_matches_transformers_torch(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "vision_with_projection":
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION))
    else:  # The layout of openai/clip-vit-large-patch14-336: a full CLIPModel folder.
        vision = {k: v for k, v in TINY_VISION.items() if k != "projection_dim"}
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, vocab_size=99)  # fmt: skip
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    _jitter_layer_norms(model)
    model.eval().save_pretrained(tmp_path, safe_serialization=True)
    pixels = _pixels(3, 32)
    with torch.no_grad():
        torch_in = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        if kind == "vision_with_projection":
            expected = model(pixel_values=torch_in).image_embeds
        else:  # transformers 5 returns the projected features as `pooler_output`.
            expected = model.get_image_features(pixel_values=torch_in).pooler_output
    expected = (expected / expected.norm(dim=-1, keepdim=True)).numpy()

    encoder, params = clip_embed.load_hf(str(tmp_path))
    assert encoder.config.image_size == 32 and encoder.projection_dim == 24
    got = _flax_embed(encoder, params, pixels)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)

    # The same parameters as a Flax msgpack folder load to the same arrays.
    flax_dir = tmp_path / "flax"
    flax_dir.mkdir()
    (flax_dir / "config.json").write_text((tmp_path / "config.json").read_text())
    (flax_dir / "flax_model.msgpack").write_bytes(flax.serialization.to_bytes(params))
    _, from_msgpack = clip_embed.load_hf(str(flax_dir))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(from_msgpack), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cmmd_errors_name_metric_path_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="cmmd.*no weights configured"):
        clip_embed.load_hf("")
    with pytest.raises(FileNotFoundError, match="cmmd.*config.json"):
        clip_embed.load_hf(str(tmp_path))
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION)).save_pretrained(tmp_path)
    # Claim a wider projection than the file holds: the first mismatched key is named.
    config = json.loads((tmp_path / "config.json").read_text())
    config["projection_dim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.WeightsError, match="cmmd.*visual_projection.weight"):
        clip_embed.load_hf(str(tmp_path))


# --- CSD: OpenAI CLIP layout ---------------------------------------------------------------


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, 4 * width),
                gelu=QuickGELU(),
                c_proj=nn.Linear(4 * width, width),
            )
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):  # (tokens, batch, width), as OpenAI CLIP
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads) for _ in range(layers)]
        )

    def forward(self, x):
        return self.resblocks(x)


class VisualTransformer(nn.Module):
    """OpenAI CLIP's ViT with `proj = None`, as CSD leaves its backbone."""

    def __init__(self, size, patch, width, layers, heads):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn((size // patch) ** 2 + 1, width)
        )
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :])


class CSD(nn.Module):
    """CSD_CLIP: backbone feature @ last_layer_style, L2-normalised."""

    def __init__(self, size=32, patch=8, width=128, layers=2, heads=2, dim=48):
        super().__init__()
        self.backbone = VisualTransformer(size, patch, width, layers, heads)
        self.last_layer_style = nn.Parameter(width**-0.5 * torch.randn(width, dim))
        self.last_layer_content = nn.Parameter(width**-0.5 * torch.randn(width, dim))

    def forward(self, x):
        style = self.backbone(x) @ self.last_layer_style
        return nn.functional.normalize(style, dim=1, p=2)


def _save_csd(model, path):
    # The released checkpoint: DataParallel names and training extras beside the weights.
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {"model_state_dict": state, "epoch": 3, "args": argparse.Namespace(arch="vit_large")},
        path,
    )
    return state


def test_csd_mapping_matches_openai_reference(tmp_path):
    torch.manual_seed(1)
    model = CSD()
    _jitter_layer_norms(model)
    path = str(tmp_path / "checkpoint.pth")
    state = _save_csd(model.eval(), path)
    pixels = _pixels(3, 32, seed=1)
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()

    encoder, params = clip_embed.load_csd(path)
    config = encoder.config
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (128, 2, 2)
    assert (config.image_size, config.patch_size, encoder.projection_dim) == (32, 8, 48)
    np.testing.assert_allclose(_flax_embed(encoder, params, pixels), expected, atol=2e-5)

    # A .safetensors copy of the state dict (the torch-free route) loads the same arrays.
    st = str(tmp_path / "csd.safetensors")
    weights.save_flat(st, {k: v.numpy() for k, v in state.items()})
    _, from_st = clip_embed.load_csd(st)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(from_st), strict=True):
        np.testing.assert_array_equal(a, b)


def test_csd_missing_key_is_named(tmp_path):
    torch.manual_seed(2)
    state = {f"module.{k}": v.numpy() for k, v in CSD().state_dict().items()}
    del state["module.backbone.transformer.resblocks.1.attn.in_proj_bias"]
    path = str(tmp_path / "broken.npz")
    weights.save_flat(path, state)
    with pytest.raises(
        weights.WeightsError,
        match=r"csd.*broken\.npz.*backbone\.transformer\.resblocks\.1\.attn\.in_proj_bias",
    ):
        clip_embed.load_csd(path)
    (tmp_path / "weights.txt").write_text("")
    with pytest.raises(weights.WeightsError, match="csd.*unsupported"):
        clip_embed.load_csd(str(tmp_path / "weights.txt"))


# --- Preprocessing ----------------------------------------------------------------------


def test_csd_preprocess_resizes_shorter_side_then_crops():
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (300, 200, 3), np.uint8))
    x = images.csd_preprocess(image)
    resized = image.resize((224, 336), Image.BICUBIC)  # torchvision Resize(224): w=224
    expected = np.asarray(resized.crop((0, 56, 224, 280)), np.float32) / 255.0
    np.testing.assert_allclose(x, images.clip_normalize(expected), atol=1e-6)


def test_cmmd_preprocess_crops_square_then_resizes():
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (101, 150, 3), np.uint8))
    x = images.cmmd_preprocess(image, 336)
    square = image.crop((24, 0, 125, 101)).resize((336, 336), Image.BICUBIC)
    np.testing.assert_allclose(
        x, images.clip_normalize(np.asarray(square, np.float32) / 255.0), atol=1e-6
    )
    assert x.shape == (336, 336, 3)


def test_cmmd_reads_pytorch_model_bin(tmp_path):
    torch.manual_seed(3)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION))
    model.save_pretrained(tmp_path / "st", safe_serialization=True)
    # transformers 5 writes only safetensors: the `.bin` of older folders by hand.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _, a = clip_embed.load_hf(str(tmp_path / "st"))
    _, b = clip_embed.load_hf(str(tmp_path / "bin"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
