"""The loop end to end on the demo config, config validation, and the non-finite stop."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from configs import demo, monet
from nsync_jax import loop, metrics, step, train


def test_demo_run_writes_metrics_and_tensorboard(tmp_path):
    config = demo.get_config()
    config.train.num_steps, config.log.every = 4, 2
    config.mesh.data, config.mesh.fsdp = 2, 4
    state = train.train(config, str(tmp_path))
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
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
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
    ],
)
def test_bad_config_is_rejected_before_building(field, value, match):
    config = demo.get_config()
    group, name = field.split(".")
    config[group][name] = value
    with pytest.raises(ValueError, match=match):
        train.setup(config)


def test_batch_must_divide_over_devices():
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
