"""Every real config validates and sets up, with its model and data pointed at stand-ins.

The stand-ins: a tiny SD folder written by PyTorch `save_pretrained` (the hub's SD 1.5
layout) for `model.pretrained`, `tfds.testing.mock_data` for the CycleGAN set, and a
negatives store with one PNG per mock example laid out as `generate_negatives.py` writes
it. Only paths and the resolution (the stand-in model is tiny) are overridden, so a field
a config sets that cannot start a run fails here. Nothing trains.
"""

import importlib

import jax
import pytest
import sd_folders
import tensorflow_datasets as tfds
from negative_stores import write_store

from nsync_jax import train

NUM_EXAMPLES = 4
REAL_CONFIGS = ("monet", "vangogh", "ukiyoe", "monet_lora", "monet_unet")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("base"))
    sd_folders.write_pipeline(root)
    return root


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_config_sets_up_with_stand_ins(name, base, tmp_path):
    config = importlib.import_module(f"configs.{name}").get_config()
    config.model.pretrained = base
    config.model.resolution = 32
    config.data.tfds_data_dir = str(tmp_path / "tfds")
    ids = [f"{config.data.split}-{i:05d}" for i in range(NUM_EXAMPLES)]
    config.negatives.path = write_store(tmp_path / "negatives", ids)
    config.mesh.data = 2  # The config's batch (2 per branch) over two of the fake devices.
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        trainer = train.setup(config, jax.devices()[:2])
    assert len(trainer.batches) == NUM_EXAMPLES
    batch = trainer.batches.batch(0)
    assert set(batch) == {"positive", "negative"}
    assert trainer.scope.name == config.train.scope
    if config.data.cache_latents:
        assert "latent_mean" in batch["positive"]


def test_multistyle_config_sets_up_with_stand_ins(base, tmp_path):
    """configs/multistyle.py: three mock CycleGAN sets, one token each, the SupCon term
    with a tiny CLIP folder standing in for the evaluation's CLIP weights."""
    from configs import multistyle
    from nsync_jax.data import styles

    config = multistyle.get_config()
    config.model.pretrained = base
    config.model.resolution = 32
    config.data.tfds_data_dir = str(tmp_path / "tfds")
    ids = [
        styles.prefixed(k, f"trainA-{i:05d}")
        for k in range(len(config.data.styles))
        for i in range(NUM_EXAMPLES)
    ]
    config.negatives.path = write_store(tmp_path / "negatives", ids)
    config.train.supcon_encoder = sd_folders.tiny_clip(tmp_path / "clip")
    config.mesh.data = 2
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        trainer = train.setup(config, jax.devices()[:2])
    assert len(trainer.batches) == len(ids)
    batch = trainer.batches.batch(0)
    assert set(batch) == {"positive", "negative"}
    assert "label" in batch["positive"] and "latent_mean" in batch["positive"]
    assert len(trainer.scope.token_ids) == 3
