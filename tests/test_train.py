"""The loop end to end on the demo config, config validation, and the non-finite stop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import plumbing
import pytest
import tensorboard_events

from configs import demo, monet
from nsync_jax import errors, loop, metrics, step, train


def test_demo_run_writes_metrics_and_tensorboard(tmp_path, tiny_sd):
    config = demo.get_config()
    config.train.num_steps, config.log.every = 4, 2
    config.mesh.data, config.mesh.fsdp = 2, 4
    state = train.train(config, str(tmp_path), base=tiny_sd)
    assert int(state.step) == 4
    rows = metrics.read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [2, 4]
    for key in (
        "loss_pos",
        "loss_neg",
        "cosine",
        "coefficient",
        "grad_norm_pos",
        "steps_per_s",
        "images_per_s",
    ):
        assert all(jnp.isfinite(r[key]) for r in rows), key
    assert rows[-1]["images_per_s"] == pytest.approx(rows[-1]["steps_per_s"] * 16)
    tensorboard_events.assert_shows_metrics_jsonl(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["train"]["mode"] == "nsync"


def test_nonfinite_state_stops_with_the_step():
    state = step.TrainState(
        step=jnp.array(7),
        rng=jax.random.key_data(jax.random.key(0)),
        trainable={},
        frozen={},
        opt_state=(),
        nonfinite_step=jnp.array(5),
    )
    with pytest.raises(FloatingPointError, match="step 5"):
        loop.check_finite(state)
    loop.check_finite(state.replace(nonfinite_step=jnp.array(-1)))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("train.mode", "sgd", "train.mode"),
        ("train.scope", "vae", "train.scope"),
        ("nsync.rule", "v5", "nsync.rule"),
        ("nsync.granularity", "per_leaf", "nsync.granularity"),
        ("train.batch_size", 0, "train.batch_size"),
        ("train.prompt_template", "in the style of {style}", "prompt_template"),
        ("train.ema_decay", 1.0, "train.ema_decay"),
        ("train.min_snr_gamma", -1.0, "train.min_snr_gamma"),
        ("train.noise_offset", -0.1, "train.noise_offset"),
        ("train.timestep_min", -1, "train.timestep_min"),
        ("train.timestep_max", 0, "train.timestep_max"),
        ("data.caption_dropout", 1.0, "data.caption_dropout"),
        ("optim.name", "adam", "optim.name"),  # Every optim field: tests/test_optim.py.
    ],
)
def test_bad_config_is_rejected_before_building(field, value, match):
    config = demo.get_config()
    group, name = field.split(".")
    config[group][name] = value
    with pytest.raises(errors.ConfigError, match=match):
        train.setup(config)


def test_a_timestep_range_past_the_models_schedule_fails_at_setup(tiny_sd):
    config = demo.get_config()
    config.train.timestep_max = config.model.tiny.num_train_timesteps + 1
    with pytest.raises(errors.ConfigError, match="schedule has 1000 timesteps"):
        train.setup(config, jax.devices()[:8], base=tiny_sd)


@pytest.mark.parametrize(
    "scope, mode, optimizer, schedule",
    [
        ("textual_inversion", "nsync", "adafactor", "cosine"),
        ("lora", "finetune", "sgd", "linear"),
        ("lora_ti", "nsync", "adamw", "warmup_cosine"),
    ],
)
def test_training_options_in_every_scope(scope, mode, optimizer, schedule, plumbing_sd):
    # The unet scope runs with every option in test_checkpoint's exact-resume test.
    config = plumbing.config()
    config.train.update(
        scope=scope,
        mode=mode,
        num_steps=2,
        ema_decay=0.5,
        min_snr_gamma=5.0,
        noise_offset=0.1,
        timestep_min=10,
        timestep_max=990,
    )
    config.data.update(demo_count=8, caption_dropout=0.5)
    config.optim.update(name=optimizer, schedule=schedule, warmup_steps=1, final_lr_fraction=0.1)
    config.mesh.fsdp = 2
    trainer = train.setup(config, jax.devices()[:8], base=plumbing_sd)
    before = jax.device_get(trainer.state.trainable)
    timer = loop.StepTimer()  # Keeps the last step's metrics.
    state = loop.run(trainer, trainer.state, 2, [timer])
    assert int(state.nonfinite_step) == -1 and all(np.isfinite(list(timer.metrics.values())))
    assert jax.tree.map(lambda x: x.sharding, state.ema) == jax.tree.map(
        lambda x: x.sharding, state.trainable
    )
    # The EMA (its values: tests/test_step.py) moved from the start, but lags the weights.
    moved = 0
    for start, ema, now in zip(
        jax.tree.leaves(before),
        jax.tree.leaves(jax.device_get(state.ema)),
        jax.tree.leaves(jax.device_get(state.trainable)),
        strict=True,
    ):
        if not np.array_equal(start, now):
            moved += 1
            assert not np.array_equal(ema, now) and not np.array_equal(ema, start)
    assert moved

    config = demo.get_config()
    config.train.batch_size = 6  # 8 fake devices.
    with pytest.raises(ValueError, match="does not divide"):
        train.setup(config)


def test_monet_config_fails_fast_naming_what_is_missing(tmp_path):
    # Data is opened before the (gigabytes of) weights, so a missing data set fails at once.
    config = monet.get_config()
    config.data.tfds_data_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="cycle_gan/monet2photo.*not prepared"):
        train.setup(config, jax.devices()[:2])


@pytest.mark.parametrize(
    "field, value",
    [("model.attention", "flash"), ("model.remat", "some"), ("model.frozen_dtype", "fp8")],
)
def test_memory_option_typos_fail_before_anything_is_built(field, value):
    config = demo.get_config()
    group, name = field.split(".")
    config[group][name] = value
    with pytest.raises(ValueError, match=field.split(".")[1]):
        train.validate_config(config)
