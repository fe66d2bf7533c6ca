"""Rebuilding a checkpointed run: scope applied, trained params restored, frozen checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from nsync_jax import errors, runs, train
from nsync_jax import scope as scope_lib


def test_build_base_is_the_model_training_uses(tiny_sd):
    # `tiny_sd` (conftest.py: `runs.build_base`) stands in for the base a run trains from:
    # it must equal the initial state `train.setup` builds, trainable and frozen merged.
    trainer = train.setup(demo.get_config(), jax.devices()[:1])
    state = jax.device_get(trainer.state)
    trained_from = trainer.scope.merge(state.trainable, state.frozen)
    assert jax.tree.structure(trained_from) == jax.tree.structure(tiny_sd[1])
    jax.tree.map(np.testing.assert_array_equal, trained_from, jax.device_get(tiny_sd[1]))


def test_unknown_model_source_is_an_error():
    config = demo.get_config().model
    config.source = "nope"
    with pytest.raises(ValueError, match="model.source"):
        runs.build_model(config, jax.random.key(0))


def _textual_inversion(tiny_sd):
    """The demo config with the textual-inversion scope, and its (trainable, frozen)."""
    config = demo.get_config()
    config.train.scope = "textual_inversion"
    scope, _, params = scope_lib.make_scope(config.train, *tiny_sd)
    return config, *scope.split(params)


def _row(trainable, value):
    return {"token_embedding": jnp.full_like(trainable["token_embedding"], value)}


def test_load_trained_textual_inversion_run(tmp_path, tiny_sd, save_run):
    config, trainable, frozen = _textual_inversion(tiny_sd)
    save_run(str(tmp_path), config, _row(trainable, 0.5), frozen)

    run = runs.load_trained(str(tmp_path))
    assert run.step == 0 and run.config.train.scope == "textual_inversion"
    token_id = run.model.tokenizer.convert_tokens_to_ids(config.train.style_token)
    table = run.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]
    np.testing.assert_array_equal(table["embedding"][token_id], 0.5)
    prompt = [f"a red circle in the style of {config.train.style_token}"]
    assert token_id in run.model.tokenize(prompt)[0]  # One token, not byte pieces.

    other_seed = demo.get_config()
    other_seed.train.scope, other_seed.seed = "textual_inversion", 1
    with pytest.raises(ValueError, match="frozen parameters differ"):
        runs.load_trained(str(tmp_path), config=other_seed)


def test_load_trained_gives_the_ema_when_the_run_kept_one(tmp_path, tiny_sd, save_run):
    config, trainable, frozen = _textual_inversion(tiny_sd)
    plain_dir, ema_dir = str(tmp_path / "plain"), str(tmp_path / "ema")
    save_run(plain_dir, config, _row(trainable, 0.5), frozen)
    config.train.ema_decay = 0.99
    save_run(ema_dir, config, _row(trainable, 0.5), frozen, ema=_row(trainable, 0.25))

    def row(run):
        return float(run.trainable["token_embedding"][0, 0])

    assert [row(runs.load_trained(ema_dir, ema=e)) for e in (None, True, False)] == [
        0.25,
        0.25,
        0.5,
    ]
    assert runs.load_trained(ema_dir).ema and not runs.load_trained(ema_dir, ema=False).ema
    plain = runs.load_trained(plain_dir)
    assert row(plain) == 0.5 and not plain.ema
    with pytest.raises(errors.ConfigError, match="kept no EMA.*train.ema_decay=0"):
        runs.load_trained(plain_dir, ema=True)


def test_init_from_makes_a_trained_run_the_base(tmp_path, tiny_sd, save_run):
    config = demo.get_config()
    scope, model, params = scope_lib.make_scope(config.train, *tiny_sd)
    trainable, frozen = scope.split(params)
    learned = jax.tree.map(lambda x: x + 1.0, trainable)
    save_run(str(tmp_path / "base"), config, learned, frozen)

    child = demo.get_config()
    child.model.init_from = str(tmp_path / "base")
    child.seed = 7  # Its own init is not used: the base run's parameters are.
    _, params = runs.build_base(child)
    jax.tree.map(np.testing.assert_array_equal, params["unet"], learned)
    jax.tree.map(np.testing.assert_array_equal, params["vae"], frozen["vae"])
    child.model.resolution = 64
    with pytest.raises(ValueError, match="resolution"):
        runs.build_base(child)
