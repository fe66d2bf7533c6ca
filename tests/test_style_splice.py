import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsync_jax.style_encoder import splice

N = 8  # Style tokens.


def _rows(length=16, dim=3, batch=1):
    # Row j of example b holds (b, j, j): every row says where it came from.
    j = np.arange(length, dtype=np.float32)
    rows = np.stack([np.zeros_like(j), j, j], axis=-1)[None].repeat(batch, axis=0)
    rows[:, :, 0] = np.arange(batch)[:, None]
    return jnp.asarray(rows[..., :dim])


def test_splice_puts_rows_in_place_and_shifts_the_rest_right():
    embeds = _rows(length=16)
    style = -jnp.arange(1, N + 1, dtype=jnp.float32)[None, :, None] * jnp.ones((1, N, 3))
    out = np.asarray(jax.jit(splice.splice_embeddings)(embeds, style, jnp.array([4])))[0]
    np.testing.assert_array_equal(out[:4], np.asarray(embeds[0, :4]))  # Before: unchanged.
    np.testing.assert_array_equal(out[4:12], np.asarray(style[0]))  # The style rows.
    # The placeholder's row is gone; what followed it (5, 6, 7) moved to 12, 13, 14, 15.
    np.testing.assert_array_equal(out[12:, 1], [5, 6, 7, 8])


def test_splice_positions_per_row_in_a_batch():
    embeds = _rows(length=16, batch=2)
    style = jnp.full((2, N, 3), -1.0)
    out = np.asarray(splice.splice_embeddings(embeds, style, jnp.array([1, 6])))
    assert (out[0, 1:9] == -1).all() and (out[0, 9:, 1] == np.arange(2, 9)).all()
    assert (out[1, :6, 1] == np.arange(6)).all() and (out[1, 6:14] == -1).all()
    kept = out[:, :, 1] >= 0  # The prompt's rows stay in their own example.
    assert (out[0, kept[0], 0] == 0).all() and (out[1, kept[1], 0] == 1).all()
    assert (out[1, 14:, 1] == [7, 8]).all()


def test_positions_find_the_placeholder_and_clamp():
    eos, sks, length = 99, 50, 20
    ids = np.full((3, length), eos, np.int32)
    ids[0, :5] = [98, 1, 2, sks, 3]  # "sks" at 3, "." at 4, EOS at 5.
    ids[1, :14] = [98, *range(1, 12), sks, 3]  # At 12: past length - N - 2 = 10.
    ids[2, :] = [98, *range(1, length)]  # Truncated: no placeholder, no EOS.
    pos = np.asarray(splice.placeholder_positions(jnp.asarray(ids), sks, eos, N))
    np.testing.assert_array_equal(pos, [3, length - N - 2, length - N - 2])
    # The paper's attention_mask.sum() - 3 for a caption that ends in "sks." + EOS.
    assert pos[0] == (np.arange(length) <= 5).sum() - 3
    with pytest.raises(ValueError, match="do not fit"):
        splice.placeholder_positions(jnp.asarray(ids[:, :10]), sks, eos, N)


def test_clamped_splice_keeps_period_and_eos_inside():
    eos, sks, length = 99, 50, 20
    ids = np.full((1, length), eos, np.int32)
    ids[0, :15] = [98, *range(1, 12), sks, 7, eos]  # Clamped from 12 to 10.
    pos = splice.placeholder_positions(jnp.asarray(ids), sks, eos, N)
    embeds = jnp.asarray(ids, jnp.float32)[..., None]
    out = np.asarray(splice.splice_embeddings(embeds, jnp.full((1, N, 1), -1.0), pos))[0, :, 0]
    # As in the paper, the rows after the clamped position follow it: the style rows fill
    # 10..17 and rows 11, 12 of the prompt move to 18, 19 (the prompt's end falls off).
    np.testing.assert_array_equal(out[:10], ids[0, :10])
    assert (out[10:18] == -1).all() and list(out[18:]) == [11, sks]


@pytest.fixture(scope="module")
def tiny_text(tiny_sd):
    model, params = tiny_sd
    return splice.placeholder_token(model, params, "sks")


def test_placeholder_is_one_token(tiny_text):
    model, params, token_id = tiny_text
    assert model.tokenizer("sks", add_special_tokens=False).input_ids == [token_id]
    table = params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    assert table.shape[0] == token_id + 1  # The tiny tokenizer split it: a row was added.
    # Asked again on the extended tokenizer, nothing more is added.
    assert splice.placeholder_token(model, params, "sks")[2] == token_id


def test_spliced_path_equals_the_text_model_on_real_token_embeddings(tiny_text):
    model, params, sks = tiny_text
    text_params = params["text_encoder"]
    ids = np.asarray(model.tokenize(["a red circle, in the style of sks."]), np.int32)
    words = model.tokenizer(
        "zero one two three four five six seven", add_special_tokens=False
    ).input_ids
    assert len(words) == N
    pos = int(np.argmax(ids[0] == sks))
    # The same prompt with the eight words typed where "sks" was.
    typed = np.concatenate([ids[0, :pos], words, ids[0, pos + 1 :]])[: ids.shape[1]][None]
    table = text_params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    style = table[jnp.asarray(words)][None]
    spliced = jax.jit(lambda p, i, s: splice.encode_spliced(model, p, i, s, sks))(
        text_params, jnp.asarray(ids), style
    )
    expected = model.encode_text(text_params, jnp.asarray(typed))
    np.testing.assert_allclose(np.asarray(spliced), np.asarray(expected), atol=2e-5, rtol=1e-5)
    # Other vectors give another context: the splice is what conditions the output.
    other = splice.encode_spliced(model, text_params, jnp.asarray(ids), style[:, ::-1], sks)
    assert np.abs(np.asarray(other) - np.asarray(expected)).max() > 1e-3
