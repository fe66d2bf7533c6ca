"""The stages as runs: order between them, config errors, and exact resume of each."""

import shutil

import jax
import numpy as np
import pytest

from configs import style_encoder_tiny
from nsync_jax import checkpoint, errors
from nsync_jax.style_encoder import run


def _config(stage):
    config = style_encoder_tiny.get_config()
    config.stage = stage
    config.data.demo_count = 16  # Two batches of 8.
    config.stage1.steps_per_batch = 2
    config.stage2.epochs = 2
    config.stage3.epochs = 2
    config.checkpoint.every = 2
    config.checkpoint.keep = 5
    config.log.every = 2
    return config


def test_config_errors_name_the_field(tmp_path):
    config = _config(1)
    config.stage = 4
    with pytest.raises(errors.ConfigError, match="stage=4"):
        run.train_stage(config, str(tmp_path))
    config = _config(1)
    config.style.head = "mlp"
    with pytest.raises(errors.ConfigError, match="style.head"):
        run.train_stage(config, str(tmp_path))
    config = _config(1)
    config.data.demo_count = 4
    with pytest.raises(errors.ConfigError, match="stage1.batch_size=8"):
        run.train_stage(config, str(tmp_path))
    config = _config(2)
    config.stage2.epochs = 0
    with pytest.raises(errors.ConfigError, match="stage2.epochs"):
        run.train_stage(config, str(tmp_path))


def test_stage2_without_stage1_says_what_to_run(tmp_path):
    with pytest.raises(errors.NotFound, match="--config.stage=1"):
        run.train_stage(_config(2), str(tmp_path))


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.saved())]


@pytest.mark.slow
def test_each_stage_resumes_exactly(tmp_path):
    """Each stage run whole, then again from its middle checkpoint: the same final state."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    finals = {}
    for stage in run.STAGES:
        finals[stage] = run.train_stage(_config(stage), str(whole))
        assert int(finals[stage].step) == 4
        assert checkpoint.saved_steps(run.stage_dir(str(whole), stage)) == [2, 4]
    for stage in run.STAGES:
        shutil.copytree(run.stage_dir(str(whole), stage), run.stage_dir(str(resumed), stage))
        shutil.rmtree(checkpoint.step_dir(run.stage_dir(str(resumed), stage), 4))
        state = run.train_stage(_config(stage), str(resumed))
        for a, b in zip(_leaves(state), _leaves(finals[stage]), strict=True):
            np.testing.assert_array_equal(a, b)
    # Stage 1 trained its vectors: the saved bank is not the initial N(0, 0.02²) draw.
    first = run.setup(_config(1), str(whole)).state.trainable["bank"]
    assert np.abs(np.asarray(finals[1].trainable["bank"]) - np.asarray(first)).max() > 1e-3


def test_real_config_sets_up_on_a_diffusers_folder_and_a_clip_tower(tmp_path):
    """configs/style_encoder.py on stand-ins for SD 1.x (a tiny diffusers folder written by
    PyTorch) and CLIP ViT-L/14 (a tiny CLIPVisionModel folder); only paths and sizes are
    overridden, so a field the config sets that cannot start a run fails here."""
    import sd_folders

    from configs import style_encoder

    sd_folders.write_pipeline(str(tmp_path / "sd"))
    config = style_encoder.get_config()
    config.model.pretrained = str(tmp_path / "sd")
    config.model.resolution = 32
    config.data.demo_count = 8
    config.style.tower_path = sd_folders.tiny_clip(tmp_path / "clip")
    stage = run.setup(config, str(tmp_path / "run"), jax.devices())
    batch = stage.batches.batch(0)
    assert batch["pixels"].shape == (8, 3, 32, 32) and batch["index"].shape == (8,)
    ids = batch["input_ids"][0]
    assert stage.placeholder_id in ids  # "sks" is one token of the loaded tokenizer.
    width = stage.model.text_encoder.config.hidden_size
    assert stage.state.trainable["bank"].shape == (8, 8, width)
    assert stage.num_steps == 200  # One batch of 8 images, 200 steps on it.


@pytest.mark.slow
def test_stage1_under_fsdp_matches_data_parallel(tmp_path):
    """The bank and its per-row optimizer state sharded over fsdp=2: the same steps."""
    states = {}
    for fsdp in (1, 2):
        config = _config(1)
        config.mesh.data, config.mesh.fsdp = 8 // fsdp, fsdp
        stage = run.setup(config, str(tmp_path / f"fsdp{fsdp}"))
        spec = tuple(stage.state_sharding.trainable["bank"].spec)
        assert ("fsdp" in spec) == (fsdp == 2)  # [16, 8, 32]: its largest dimension.
        state = stage.state
        for step in range(3):
            state, _ = stage.step_fn(state, stage.batch(step))
        states[fsdp] = np.asarray(state.trainable["bank"])
    # Another reduction order; Adam's normalised steps (lr 1e-3 each) carry it: 2e-5 is 1 %
    # of the three updates, while any row written to the wrong place would differ by ~1e-3.
    np.testing.assert_allclose(states[2], states[1], rtol=0, atol=2e-5)
    assert (
        np.abs(
            states[1] - run.setup(_config(1), str(tmp_path / "init")).state.trainable["bank"]
        ).max()
        > 1e-3
    )
