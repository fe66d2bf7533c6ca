"""Samples during training, the validation loss, the end-of-run summary and the progress
lines off a terminal."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from configs import demo
from nsync_jax import errors, metrics, previews, train, validation
from nsync_jax.data import sources


def test_default_prompts_are_training_prompts_and_one_unseen():
    prompts = previews.default_prompts(["a", "b", "a", "c", "d"], "{caption}, by {style}", "X")
    assert prompts == ["a", "b", "c", f"{previews.UNSEEN_CAPTION}, by X"]


def _config(learning_rate):
    config = demo.get_config()
    config.train.num_steps, config.log.every = 4, 2
    config.data.demo_count = 12
    config.data.val_count, config.log.val_every = 4, 2
    config.optim.learning_rate = learning_rate
    config.sample.every = 2
    config.sample.scheduler, config.sample.num_steps = "ddim", 2
    config.sample.batch_per_device = 1
    return config


def _grids(workdir):
    out = {}
    with open(os.path.join(workdir, "samples", "index.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            with Image.open(os.path.join(workdir, "samples", row["file"])) as image:
                out[row["step"]] = np.asarray(image)
    return out


def test_samples_at_fixed_steps_follow_the_weights(tmp_path, caplog):
    # Learning rate 0: the weights never change, so neither do the pictures.
    frozen = str(tmp_path / "frozen")
    with caplog.at_level(logging.INFO):
        train.train(_config(0.0), frozen, config_file="configs/demo.py")
    grids = _grids(frozen)
    assert sorted(grids) == [0, 2, 4]
    assert sorted(os.listdir(os.path.join(frozen, "samples"))) == [
        "000000.png",
        "000002.png",
        "000004.png",
        "index.jsonl",
    ]
    for step in (2, 4):
        np.testing.assert_array_equal(grids[step], grids[0])
    # Four prompts (three training ones, one unseen), tiles enlarged to 128 px.
    assert grids[0].shape[1] == 2 * previews.MIN_TILE
    # The validation loss: fixed noise and timesteps, so unchanged weights score the same.
    rows = metrics.read_metrics(frozen)
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[0]["val_loss"] == rows[1]["val_loss"] > 0
    assert "8 style images (4 more held out)" in caplog.text
    # Off a terminal: one progress line per log interval; then the summary block.
    text = caplog.text
    assert "train: step 2/4, loss_pos" in text and "train: step 4/4" in text
    assert "run summary" in text and "0 -> 4 of 4, finished" in text
    assert os.path.join(frozen, "checkpoints", "4") in text
    assert f"python launch/export.py --workdir {frozen}" in text
    assert "python launch/sample.py --config configs/demo.py" in text

    # Training: the pictures move away from the base's, the same seeds and prompts.
    trained = str(tmp_path / "trained")
    train.train(_config(1e-2), trained)
    moved = _grids(trained)
    np.testing.assert_array_equal(moved[0], grids[0])  # The same base and seeds.
    assert np.abs(moved[4].astype(int) - grids[4].astype(int)).max() > 0
    rows = metrics.read_metrics(trained)
    assert rows[0]["val_loss"] != rows[1]["val_loss"]


def test_validation_split_is_fixed_by_the_seed_and_checked(tmp_path):
    config = _config(0.0)
    positives = sources.load_positives(config.data, config.model.resolution)
    train_a, held_a = validation.split_validation(positives, 4, seed=0)
    train_b, held_b = validation.split_validation(positives, 4, seed=0)
    assert held_a.ids == held_b.ids and len(held_a) == 4 and len(train_a) == 8
    assert not set(held_a.ids) & set(train_a.ids)
    assert validation.split_validation(positives, 4, seed=1)[1].ids != held_a.ids
    with pytest.raises(errors.ConfigError, match="data.val_count=12"):
        validation.split_validation(positives, 12, seed=0)
    for val_count, val_every, match in ((4, 0, "together"), (0, 2, "together"), (4, 3, "multiple")):
        config.data.val_count, config.log.val_every = val_count, val_every
        with pytest.raises(errors.ConfigError, match=match):
            train.train(config, str(tmp_path))


def test_sample_settings_are_checked_before_training(tmp_path):
    config = _config(0.0)
    config.sample.scheduler, config.sample.num_steps = "pndm", 3
    with pytest.raises(errors.ConfigError, match="sample .*pndm"):
        train.train(config, str(tmp_path))
    config = _config(0.0)
    config.sample.prompts = ("a cat", " ")
    with pytest.raises(errors.ConfigError, match="sample.prompts"):
        train.train(config, str(tmp_path))
