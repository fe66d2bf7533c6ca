"""Tests of nsync_jax/data/sources.py: choosing positives and negatives by config."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import default, monet, ukiyoe, vangogh
from nsync_jax.data import sources
from nsync_jax.data.examples import Examples, LazyExamples


def test_demo_source_and_its_negatives_share_ids():
    config = default.get_config()
    positives = sources.load_positives(config.data, 16)
    negatives = sources.load_negatives(config.negatives, config.data, 16)
    assert isinstance(positives, Examples) and positives.ids == negatives.ids


def test_tfds_source_from_the_monet_config():
    config = monet.get_config()
    with tfds.testing.mock_data(num_examples=4):
        positives = sources.load_positives(config.data, 16)
    assert isinstance(positives, LazyExamples) and positives.ids[0] == "trainA-00000"
    assert positives.image(0).shape == (16, 16, 3)


def test_style_configs_pick_their_cyclegan_set():
    names = {c.get_config().data.tfds_name for c in (monet, vangogh, ukiyoe)}
    assert names == {"cycle_gan/monet2photo", "cycle_gan/vangogh2photo", "cycle_gan/ukiyoe2photo"}
    for c in (monet, vangogh, ukiyoe):
        data = c.get_config().data
        assert data.source == "tfds" and data.split == "trainA" and data.cache_latents


def test_folder_source(tmp_path):
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "t"}))
    config = default.get_config()
    config.data.source = "folder"
    config.data.path = str(tmp_path)
    assert sources.load_positives(config.data, 8).captions == ("t",)


def test_unknown_sources_are_named():
    config = default.get_config()
    config.data.source = "webdataset"
    with pytest.raises(ValueError, match="data.source='webdataset'"):
        sources.load_positives(config.data, 8)
    config.data.source = "tfds"
    with pytest.raises(ValueError, match="pairs only with data.source='demo'"):
        sources.load_negatives(config.negatives, config.data, 8)


def test_reading_data_imports_no_model_or_sampling_code():
    # The negatives store reader lives in data/; generation (models, sampling) imports it,
    # not the other way round, so there is no cycle through data/sources.py.
    code = (
        "import sys, nsync_jax.data.sources\n"
        "bad = [m for m in ('nsync_jax.negatives', 'nsync_jax.sampling', 'nsync_jax.models')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert 'nsync_jax.data.negatives_store' in sys.modules\n"  # No lazy import needed.
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)
