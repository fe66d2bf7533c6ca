"""The three stages' steps on tiny models: what trains, what the loss reads."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from nsync_jax import step as step_lib
from nsync_jax.data import demo
from nsync_jax.data.examples import to_pixels
from nsync_jax.style_encoder import encoder as encoder_lib
from nsync_jax.style_encoder import splice, stages

N = 8  # Style tokens.


@pytest.fixture(scope="module")
def sd(tiny_sd):
    model, params = tiny_sd
    return splice.placeholder_token(model, params, "sks")


def _batch(model, rows, resolution=32):
    examples = demo.demo_examples(6, resolution, 0, True)
    prompts = [f"{examples.captions[r]}, in the style of sks." for r in rows]
    images = np.stack([examples.image(r) for r in rows])
    return {
        "pixels": jnp.asarray(to_pixels(images)),
        "input_ids": jnp.asarray(model.tokenize(prompts), jnp.int32),
        "index": jnp.asarray(rows, jnp.int32),
    }


def _tiny_encoder(dim, seed=0):
    style = ml_collections.ConfigDict(
        dict(num_tokens=N, head="linear", tower="tiny", tower_path="")
    )
    style.tiny_tower = ml_collections.ConfigDict(
        dict(hidden=32, layers=2, heads=4, image_size=32, patch_size=8)
    )
    return encoder_lib.build(style, dim, jax.random.key(seed))


def test_stage1_loss_reads_the_updated_bank_and_writes_only_the_batch_rows(sd):
    model, params, sks = sd
    dim = model.text_encoder.config.hidden_size
    tx = optax.adamw(0.05, weight_decay=0.01)  # Large: one update visibly moves the loss.
    bank = stages.init_bank(jax.random.key(1), 6, N, dim, 0.02)
    state = stages.init_stage1_state(bank, params, tx, jax.random.key(2))
    step = jax.jit(stages.make_stage1_step(model, tx, sks))
    batch = _batch(model, [4, 1])
    first, _ = step(state, batch)
    second, metrics = step(first, batch)

    # Rows outside the batch: bank and optimizer state untouched, bit for bit.
    others = np.array([0, 2, 3, 5])
    np.testing.assert_array_equal(
        np.asarray(state.trainable["bank"])[others], np.asarray(second.trainable["bank"])[others]
    )
    for b, a in zip(
        jax.tree.leaves(state.opt_state), jax.tree.leaves(second.opt_state), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(b)[others], np.asarray(a)[others])
    moved = np.asarray(second.trainable["bank"])[[4, 1]] - np.asarray(bank["bank"])[[4, 1]]
    assert (
        np.abs(moved).min(axis=(1, 2)).max() > 0 and (np.abs(moved).max(axis=(1, 2)) > 0.05).all()
    )
    counts = [np.asarray(x) for x in jax.tree.leaves(second.opt_state) if x.dtype == jnp.int32]
    assert any((c == [0, 2, 0, 0, 2, 0]).all() for c in counts)  # Per-row AdamW steps.

    # Step 2's loss is the loss of the bank as step 1 left it (with step 2's draws), not
    # of the initial vectors (what the public code's stale copy computes).
    loss = stages.make_diffusion_loss(model)

    @jax.jit
    def loss_at(bank_rows, rng):
        context = splice.encode_spliced(
            model, params["text_encoder"], batch["input_ids"], bank_rows, sks
        )
        return loss(params, batch["pixels"], context, rng)

    def at(bank_rows):
        return float(loss_at(bank_rows, first.step_key()))

    updated = at(first.trainable["bank"][batch["index"]])
    initial = at(bank["bank"][batch["index"]])
    assert float(metrics["loss"]) == pytest.approx(updated, rel=1e-5, abs=1e-6)
    assert abs(updated - initial) > 100 * abs(float(metrics["loss"]) - updated) + 1e-5


def test_stage2_overfits_a_tiny_set():
    encoder, params = _tiny_encoder(16)
    tx = optax.adamw(3e-3, weight_decay=0.0)
    targets = {"bank": jax.random.normal(jax.random.key(3), (4, N, 16)) * 0.5}
    state = jax.jit(lambda t, f: step_lib.init_state(t, f, tx, jax.random.key(0)))(params, targets)
    step = jax.jit(stages.make_stage2_step(encoder, tx))
    examples = demo.demo_examples(4, 32, 0, True)
    batch = {
        "pixels": jnp.asarray(to_pixels(np.stack([examples.image(i) for i in range(4)]))),
        "index": jnp.arange(4, dtype=jnp.int32),
    }
    losses = []
    for _ in range(150):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.02 * losses[0], losses[::25]
    assert int(state.nonfinite_step) == -1


def test_stage3_trains_only_the_encoder_through_the_text_transformer(sd):
    model, params, sks = sd
    dim = model.text_encoder.config.hidden_size
    encoder, enc_params = _tiny_encoder(dim)
    tx = optax.adamw(1e-3)
    state = step_lib.init_state(enc_params, params, tx, jax.random.key(0))
    step = jax.jit(stages.make_stage3_step(model, encoder, tx, sks))
    batch = _batch(model, [0, 3])
    after, metrics = step(state, batch)
    # Gradients reach the encoder only: its optimizer state and nothing else; the tower
    # and the projection both move; the frozen SD parameters are the same arrays' values.
    assert jax.tree.structure(optax.tree.get(after.opt_state, "mu")) == jax.tree.structure(
        enc_params
    )
    for name in ("vision_model", "projection"):
        change = optax.tree.norm(
            jax.tree.map(jnp.subtract, after.trainable[name], enc_params[name])
        )
        assert float(change) > 0, name
    for a, b in zip(jax.tree.leaves(after.frozen), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(float(metrics["loss"]))

    # The context goes through the text transformer (the public code's stage 3 skips it):
    # another final layer norm changes the loss.
    def loss_with(text_params):
        frozen = {**params, "text_encoder": text_params}
        s = step_lib.init_state(enc_params, frozen, tx, jax.random.key(0))
        return float(step(s, batch)[1]["loss"])

    text = params["text_encoder"]
    norm = text["text_model"]["final_layer_norm"]
    shifted = {
        "text_model": {
            **text["text_model"],
            "final_layer_norm": {**norm, "bias": norm["bias"] + 1.0},
        }
    }
    assert abs(loss_with(shifted) - float(metrics["loss"])) > 1e-4
