"""`models/clip.py` against transformers 5's PyTorch CLIP on the same random weights.

Text: weights reach our tree through `weights.stored_key_rule` / `match_torch_keys` in
both checkpoint layouts (transformers 5's `save_pretrained`, keys without `text_model.`;
the older hub layout with it); both pooling rules; both activations. Vision: the tower
and its projection of `CLIPVisionModelWithProjection`. LayerNorms get random scales and
biases so that a swapped pair shows.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict, unflatten_dict

from nsync_jax import errors, weights
from nsync_jax.models import clip

VOCAB, LENGTH, REAL_EOS = 99, 16, 49
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=LENGTH,
    projection_dim=24,
    bos_token_id=0,
    pad_token_id=1,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=24,
)


def _jitter_layer_norms(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return model.eval()


def _tree(shapes, state, stored_key):
    """`state` (NumPy, keyed as the file names them) in our tree of `shapes`."""
    expected = flatten_dict(shapes)
    available = {k: tuple(v.shape) for k, v in state.items()}
    keys = weights.match_torch_keys("test", expected, available, stored_key)
    assert sorted(keys.values()) == sorted(state)  # Every tensor used.
    return unflatten_dict(
        {p: jnp.asarray(weights.to_flax_layout(p[-1], state[k])) for p, k in keys.items()}
    )


def _text_params(model, state):
    shapes = jax.eval_shape(lambda r: model.init_weights(r, (1, LENGTH)), jax.random.key(0))
    return _tree(shapes, state, weights.stored_key_rule("text_encoder", state))


def _input_ids(eos_id):
    """Rows `bos, words..., eos, eos...` (SD pads with EOS) with the largest id (VOCAB − 1)
    placed before the EOS in two rows, so that the two pooling rules pick different
    positions whenever eos_id is not the largest id."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB - 1, (3, LENGTH))
    ids[ids == REAL_EOS] = 3
    ids[:, 0] = 0
    for row, end in enumerate((5, 9, LENGTH - 1)):
        ids[row, end:] = eos_id
    ids[0, 2] = ids[1, 4] = VOCAB - 1
    if eos_id == 2:  # Legacy configs: the tokenizer's real EOS is the largest id.
        ids[2, LENGTH - 1] = VOCAB - 1
    return ids


def _close(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _torch_text(cls, eos_id, act):
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**TEXT, eos_token_id=eos_id, hidden_act=act)
    return _jitter_layer_norms(cls(config))


# Each layout with both pooling rules and both activations (four cases, not eight: each
# factor is independent of the others in the code).
@pytest.mark.parametrize(
    "layout, eos_id, act",
    [
        ("save_pretrained", 2, "quick_gelu"),
        ("save_pretrained", REAL_EOS, "gelu"),
        ("text_model_prefix", 2, "gelu"),
        ("text_model_prefix", REAL_EOS, "quick_gelu"),
    ],
)
def test_text_model_matches_transformers(layout, eos_id, act, tmp_path):
    reference = _torch_text(transformers.CLIPTextModel, eos_id, act)
    if layout == "save_pretrained":  # transformers 5's folder: no `text_model.` prefix.
        reference.save_pretrained(tmp_path)
        config = clip.CLIPTextConfig.from_pretrained(str(tmp_path))
        _, files = weights.find_weights(str(tmp_path), "text_encoder")
        with weights.open_torch_files(files) as (shapes, read):
            state = {k: read(k) for k in shapes}
        assert not any(k.startswith("text_model.") for k in state)
    else:  # The hub's transformers-4 checkpoints (e.g. SD 1.5): keys under `text_model.`.
        config = clip.CLIPTextConfig.from_dict(reference.config.to_dict())
        state = {f"text_model.{k}": v.numpy() for k, v in reference.state_dict().items()}
    assert (config.eos_token_id, config.hidden_act) == (eos_id, act)
    model = clip.CLIPTextModel(config)
    params = _text_params(model, state)

    ids = _input_ids(eos_id)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids), output_hidden_states=True)
    run = jax.jit(lambda p, x: model.apply({"params": p}, x, output_hidden_states=True))
    ours = run(params, ids)
    _close(ours.last_hidden_state, expected.last_hidden_state)
    _close(ours.pooler_output, expected.pooler_output)
    assert len(ours.hidden_states) == len(expected.hidden_states) == 3
    _close(ours.hidden_states[-2], expected.hidden_states[-2])  # SD 2's "clip skip" input.
    for a, b in zip(ours.hidden_states, expected.hidden_states, strict=True):
        _close(a, b)
    # The rows where the rules disagree: each config pools at its own rule's position.
    first_eos = (ids == eos_id).argmax(-1) if eos_id != 2 else ids.argmax(-1)
    _close(ours.pooler_output, np.asarray(ours.last_hidden_state)[np.arange(3), first_eos])
    assert (ids.argmax(-1) != (ids == REAL_EOS).argmax(-1))[:2].all()


def test_projection_model_matches_transformers():
    reference = _torch_text(transformers.CLIPTextModelWithProjection, REAL_EOS, "quick_gelu")
    config = clip.CLIPTextConfig.from_dict(reference.config.to_dict())
    model = clip.CLIPTextModelWithProjection(config)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    params = _text_params(model, state)
    ids = _input_ids(REAL_EOS)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids))
    ours = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids)
    assert ours.text_embeds.shape == (3, 24)
    _close(ours.text_embeds, expected.text_embeds)
    _close(ours.last_hidden_state, expected.last_hidden_state)


def _random_params(model, seed=0):
    """Random parameters of our text model's tree, drawn in NumPy (no init to compile)."""
    shapes = jax.eval_shape(lambda r: model.init_weights(r, (1, LENGTH)), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0.0, 0.2, s.shape).astype(np.float32), shapes)


def test_token_embeds_replace_the_lookup():
    config = clip.CLIPTextConfig(**TEXT, eos_token_id=REAL_EOS)
    model = clip.CLIPTextModel(config)
    params = _random_params(model)
    ids = _input_ids(config.eos_token_id)

    @jax.jit
    def run(p):
        embeds = model.apply({"params": p}, ids, method=model.embed_tokens)
        plain = model.apply({"params": p}, ids).last_hidden_state
        same = model.apply({"params": p}, ids, token_embeds=embeds).last_hidden_state
        other = model.apply({"params": p}, ids, token_embeds=embeds.at[:, 3].set(1.0))
        return embeds, plain, same, other.last_hidden_state

    embeds, plain, same, other = (np.asarray(x) for x in run(params))
    table = params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    np.testing.assert_array_equal(embeds, table[ids])
    np.testing.assert_allclose(same, plain, rtol=1e-6, atol=1e-6)
    # Causal: positions before the change see nothing of it, the ones after do.
    np.testing.assert_array_equal(other[:, :3], plain[:, :3])
    assert np.abs(other[:, 3:] - plain[:, 3:]).min() > 0


def test_lora_on_q_proj_equals_the_merged_kernel():
    config = clip.CLIPTextConfig(**TEXT, eos_token_id=REAL_EOS)
    scale = 0.75
    model = clip.CLIPTextModel(config, lora_scale=scale)
    params = _random_params(model)
    q_proj = params["text_model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"]
    rng = np.random.default_rng(1)
    a = rng.normal(size=(32, 4)).astype(np.float32)
    b = rng.normal(size=(4, 32)).astype(np.float32) * 0.1
    with_lora = jax.tree.map(lambda x: x, params)
    with_lora["text_model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"] = {
        **q_proj,
        "lora_a": a,
        "lora_b": b,
    }
    merged = jax.tree.map(lambda x: x, params)
    merged["text_model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"] = {
        **q_proj,
        "kernel": q_proj["kernel"] + scale * a @ b,
    }
    ids = _input_ids(config.eos_token_id)
    run = jax.jit(lambda p: model.apply({"params": p}, ids).last_hidden_state)
    plain, adapted, folded = run(params), run(with_lora), run(merged)
    _close(adapted, folded)
    assert np.abs(np.asarray(adapted) - np.asarray(plain)).max() > 1e-3 * np.abs(plain).max()


def test_text_config_files(tmp_path):
    config = clip.CLIPTextConfig(**TEXT, hidden_act="gelu")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    loaded = transformers.CLIPTextConfig.from_pretrained(tmp_path)
    assert clip.CLIPTextConfig.from_dict(loaded.to_dict()) == config
    assert loaded.architectures == ["CLIPTextModel"]
    assert clip.CLIPTextConfig.from_pretrained(str(tmp_path)) == config
    # transformers' defaults for what an old config.json leaves out.
    assert clip.CLIPTextConfig.from_dict({}) == clip.CLIPTextConfig.from_dict(
        transformers.CLIPTextConfig().to_dict()
    )
    with pytest.raises(errors.NotFound, match="nope/config.json"):
        clip.CLIPTextConfig.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(errors.ConfigError, match="hidden_act='gelu_new'"):
        clip.CLIPTextConfig.from_dict({**TEXT, "hidden_act": "gelu_new"})


# --- Vision ---------------------------------------------------------------------------------


def _vision_params(model, state):
    """`CLIPVisionModelWithProjection`'s state in our tree: `torch_key` names everything but
    the class token, a bare parameter (no `.weight`) of the embeddings."""
    shapes = jax.eval_shape(model.init_weights, jax.random.key(0))
    cls_path = ("vision_model", "embeddings", "class_embedding")
    cls_shape = flatten_dict(shapes).pop(cls_path)
    rest = {k: v for k, v in state.items() if k != "vision_model.embeddings.class_embedding"}
    flat = flatten_dict(
        _tree(
            unflatten_dict({p: s for p, s in flatten_dict(shapes).items() if p != cls_path}),
            rest,
            weights.same_key,
        )
    )
    flat[cls_path] = jnp.asarray(state["vision_model.embeddings.class_embedding"])
    assert flat[cls_path].shape == cls_shape.shape
    return unflatten_dict(flat)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_vision_model_matches_transformers(act):
    torch.manual_seed(0)
    reference = _jitter_layer_norms(
        transformers.CLIPVisionModelWithProjection(
            transformers.CLIPVisionConfig(**VISION, hidden_act=act)
        )
    )
    config = clip.CLIPVisionConfig.from_dict(reference.config.to_dict())
    assert config == clip.CLIPVisionConfig(**VISION, hidden_act=act)
    model = clip.CLIPVisionModelWithProjection(config)
    params = _vision_params(model, {k: v.numpy() for k, v in reference.state_dict().items()})

    pixels = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        nchw = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        expected = reference(pixel_values=nchw, output_hidden_states=True)
    ours = jax.jit(lambda p, x: model.apply({"params": p}, x, output_hidden_states=True))(
        params, pixels
    )
    _close(ours.image_embeds, expected.image_embeds)
    _close(ours.last_hidden_state, expected.last_hidden_state)
    for a, b in zip(ours.hidden_states, expected.hidden_states, strict=True):
        _close(a, b)
    # The tower alone (what the style encoder and CMMD hold) pools post_layernorm(CLS).
    tower = clip.CLIPVisionTransformer(config)
    pooled = jax.jit(lambda p, x: tower.apply({"params": p}, x).pooler_output)(
        params["vision_model"], pixels
    )
    with torch.no_grad():
        expected_pooled = reference.vision_model(pixel_values=nchw).pooler_output
    _close(pooled, expected_pooled)


def test_vision_config_and_input_checks(tmp_path):
    config = clip.CLIPVisionConfig(**VISION)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    loaded = transformers.CLIPVisionConfig.from_pretrained(tmp_path)
    assert clip.CLIPVisionConfig.from_pretrained(str(tmp_path)) == config
    assert clip.CLIPVisionConfig.from_dict(loaded.to_dict()) == config
    assert clip.CLIPVisionConfig.from_dict({}) == clip.CLIPVisionConfig.from_dict(
        transformers.CLIPVisionConfig().to_dict()
    )
    with pytest.raises(errors.ConfigError, match="patch_size"):
        clip.CLIPVisionConfig(**{**VISION, "patch_size": 7})
    tower = clip.CLIPVisionTransformer(config)
    params = jax.eval_shape(tower.init_weights, jax.random.key(0))
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(lambda p: tower.apply({"params": p}, jnp.zeros((1, 3, 32, 32))), params)
