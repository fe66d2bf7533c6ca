import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from nsync_jax import scope


@pytest.fixture
def tiny(tiny_sd):
    return tiny_sd


def _embedding(params):
    return params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]


def test_unet_scope_round_trip(tiny):
    model, params = tiny
    train = demo.get_config().train
    train.scope = "unet"
    s, _, params = scope.make_scope(train, model, params)
    trainable, frozen = s.split(params)
    assert trainable is params["unet"] and set(frozen) == {"vae", "text_encoder"}
    assert s.merge(trainable, frozen) == params


def test_unet_text_encoder_scope_trains_both(tiny):
    model, params = tiny
    train = demo.get_config().train
    train.scope = "unet_text_encoder"
    s, _, params = scope.make_scope(train, model, params)
    trainable, frozen = s.split(params)
    assert set(trainable) == {"unet", "text_encoder"} and set(frozen) == {"vae"}
    assert s.merge(trainable, frozen) == params
    assert s.trained_components() == ("unet", "text_encoder")

    # The diffusion output depends on both trainable parts: each gets a gradient.
    ids = model.tokenize(["a red circle"])
    latents = jnp.ones((1, *model.latent_shape))

    def f(t):
        merged = s.merge(t, frozen)
        context = model.encode_text(merged["text_encoder"], ids)
        return jnp.sum(model.predict_noise(merged["unet"], latents, jnp.array([10]), context) ** 2)

    grads = jax.grad(f)(trainable)
    for part in ("unet", "text_encoder"):
        norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads[part]))
        assert norm > 0, part


def test_textual_inversion_adds_one_trainable_row(tiny):
    model, params = tiny
    train = demo.get_config().train
    train.scope, train.style_token, train.initializer_token = (
        "textual_inversion",
        "<s*>",
        "painting",
    )
    s, ti_model, ti_params = scope.make_scope(train, model, params)
    old, new = _embedding(params), _embedding(ti_params)
    assert new.shape == (old.shape[0] + 1, old.shape[1])
    init_id = model.tokenizer.convert_tokens_to_ids("painting</w>")
    np.testing.assert_array_equal(new[s.token_id], old[init_id])
    # The placeholder is one token of the extended tokenizer; the original is untouched.
    assert ti_model.tokenizer.tokenize("<s*>") == ["<s*>"]
    assert len(model.tokenizer) == old.shape[0]
    trainable, frozen = s.split(ti_params)
    assert jax.tree.map(jnp.shape, trainable) == {"token_embedding": (1, old.shape[1])}

    # Only the row gets a gradient through the text encoder; the rest of the table is
    # frozen input.
    ids = ti_model.tokenize(["a red circle in the style of <s*>"])

    def f(t):
        merged = s.merge(t, frozen)
        return jnp.sum(ti_model.encode_text(merged["text_encoder"], ids) ** 2)

    grad = jax.grad(f)(trainable)["token_embedding"]
    assert float(jnp.abs(grad).sum()) > 0
    moved = {"token_embedding": trainable["token_embedding"] + 1.0}
    merged = _embedding(s.merge(moved, frozen))
    np.testing.assert_array_equal(merged[s.token_id], new[s.token_id] + 1.0)
    np.testing.assert_array_equal(merged[: s.token_id], new[: s.token_id])


def test_placeholder_already_known_is_an_error(tiny):
    model, params = tiny
    train = demo.get_config().train
    train.scope, train.style_token = "textual_inversion", "painting"
    with pytest.raises(ValueError, match="already in the tokenizer"):
        scope.make_scope(train, model, params)


def test_unknown_scope(tiny):
    model, params = tiny
    train = demo.get_config().train
    train.scope = "everything"
    with pytest.raises(ValueError, match="train.scope"):
        scope.make_scope(train, model, params)
