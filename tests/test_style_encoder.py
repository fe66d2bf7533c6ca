"""The style encoder: shapes, loading a tower from a Hugging Face folder, and the PyTorch
export reproducing our tokens."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import CLIPVisionModel

from nsync_jax.style_encoder import encoder as encoder_lib

N, D = 8, 32


def _style(head="linear", tower="tiny", path=""):
    style = ml_collections.ConfigDict()
    style.num_tokens, style.head, style.tower, style.tower_path = N, head, tower, path
    style.tiny_tower = ml_collections.ConfigDict(
        dict(hidden=32, layers=2, heads=4, image_size=32, patch_size=8)
    )
    return style


def _jitter(params, seed=1):
    # Random LayerNorm scales and biases (defaults 1 and 0 would hide a swapped pair).
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


@pytest.fixture(scope="module")
def tiny():
    encoder, params = encoder_lib.build(_style(), D, jax.random.key(0))
    return encoder, _jitter(params)


def _pixels(n=3, size=32):
    return np.random.default_rng(0).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def test_tokens_shape_and_slice_head():
    encoder, params = encoder_lib.build(_style(), D, jax.random.key(0))
    tokens = jax.jit(encoder.apply)({"params": params}, _pixels())
    assert tokens.shape == (3, N, D)
    assert set(params) == {"vision_model", "projection"}
    assert params["projection"]["kernel"].shape == (32, N * D)
    sliced, sliced_params = encoder_lib.build(_style("slice"), 48, jax.random.key(0))
    assert set(sliced_params) == {"vision_model"}
    out = np.asarray(sliced.apply({"params": sliced_params}, _pixels()))
    assert out.shape == (3, N, 48) and (out[..., 32:] == 0).all() and (out[..., :32] != 0).any()


def test_tower_inputs_resize():
    pixels = jnp.asarray(_pixels(2, 64)).transpose(0, 3, 1, 2)
    out = encoder_lib.tower_inputs(pixels, 32)
    assert out.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(
        encoder_lib.tower_inputs(pixels, 64), pixels.transpose(0, 2, 3, 1)
    )


def test_export_reproduces_tokens_in_pytorch(tiny, tmp_path):
    encoder, params = tiny
    written = encoder_lib.export_torch(str(tmp_path), encoder, params)
    info = json.loads(open(written["info"]).read())
    assert (info["num_tokens"], info["token_dim"], info["image_size"]) == (N, D, 32)
    pixels = _pixels()
    expected = np.asarray(encoder.apply({"params": params}, pixels))
    # The snippet of docs/style_encoder.md.
    tower = CLIPVisionModel.from_pretrained(written["vision"]).eval()
    projection = load_file(written["projection"])
    linear = torch.nn.Linear(*projection["weight"].shape[::-1])
    linear.load_state_dict({k: torch.from_numpy(v) for k, v in projection.items()})
    with torch.no_grad():
        nchw = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        tokens = linear(tower(pixel_values=nchw).pooler_output).reshape(-1, N, D).numpy()
    np.testing.assert_allclose(tokens, expected, atol=1e-4, rtol=1e-4)
    assert np.abs(expected).max() > 0.1  # Not a vacuous match of zeros.


def test_pretrained_tower_loads_from_the_exported_folder(tiny, tmp_path):
    encoder, params = tiny
    written = encoder_lib.export_torch(str(tmp_path), encoder, params)
    style = _style(tower="pretrained", path=written["vision"])
    loaded_encoder, loaded = encoder_lib.build(style, D, jax.random.key(5))
    assert loaded_encoder.vision_config.hidden_size == 32
    for a, b in zip(
        jax.tree.leaves(loaded["vision_model"]),
        jax.tree.leaves(params["vision_model"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="tower_path"):
        encoder_lib.build(_style(tower="pretrained"), D, jax.random.key(0))
    with pytest.raises(FileNotFoundError):
        encoder_lib.build(
            _style(tower="pretrained", path=str(tmp_path / "nope")), D, jax.random.key(0)
        )


def test_tower_of_a_full_clip_folder_matches_pytorch(tmp_path):
    """A `CLIPModel` folder (CLIP ViT-L/14's layout on the hub): the vision tower loads and
    its pooled output equals transformers' PyTorch tower on the same pixels."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    for m in model.modules():  # Random norms: a swapped scale and bias would show.
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias, 0.0, 0.1)
    model.save_pretrained(tmp_path)
    encoder, params = encoder_lib.build(
        _style(tower="pretrained", path=str(tmp_path)), D, jax.random.key(0)
    )
    pixels = _pixels()
    ours = encoder.apply(
        {"params": params},
        pixels,
        method=lambda m, x: m.vision_model(x).pooler_output,
    )
    with torch.no_grad():
        theirs = model.vision_model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    np.testing.assert_allclose(np.asarray(ours), theirs.pooler_output.numpy(), atol=1e-4)
