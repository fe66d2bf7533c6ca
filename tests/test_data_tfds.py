"""Tests of nsync_jax/data/tfds_source.py through `tfds.data_source`, without TensorFlow.

`tfds.testing.mock_data` mocks `tfds.data_source` itself (random images with the real
dataset's features), so these tests run the same code a real run does; fakes passed as
`as_data_source_fn` add what CycleGAN lacks (file names, captions) or bad bytes.
"""

import io
import logging
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import default
from nsync_jax.data import tfds_source
from nsync_jax.data.examples import BadImageError


def _config(**overrides):
    config = default.get_config().data
    config.source = "tfds"
    for key, value in overrides.items():
        config[key] = value
    return config


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((12, 20, 3), value, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _fake_source(records, with_text=True):
    """`as_data_source_fn` serving `records` (dicts with PNG bytes) through the real
    TFDS image decoder, as an array_record source would."""
    features = {"image": tfds.features.Image()}
    if with_text:
        features.update(file_name=tfds.features.Text(), caption=tfds.features.Text())
    features = tfds.features.FeaturesDict(features)

    class Source:
        dataset_info = types.SimpleNamespace(features=features)

        def __init__(self, skip_images):
            self.skip_images = skip_images

        def __len__(self):
            return len(records)

        def __getitem__(self, i):
            record = dict(records[i])
            if not self.skip_images:
                record["image"] = features["image"].decode_example_np(record["image"])
            return record

    def as_data_source(builder, split, decoders=None, **kwargs):
        del builder, split, kwargs
        return Source(skip_images=bool(decoders))

    return as_data_source


def test_mock_monet_ids_template_and_lazy_reads(caplog):
    with caplog.at_level(logging.INFO), tfds.testing.mock_data(num_examples=6):
        examples = tfds_source.tfds_examples(_config(), 16)
        assert examples.ids == tuple(f"trainA-{i:05d}" for i in range(6))
        assert examples.reads == 0
        image = examples.image(4)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8 and examples.reads == 1
    assert set(examples.captions) == {"a painting"}
    assert "TFDS cycle_gan/monet2photo trainA has none for its 6 examples" in caplog.text


def test_split_and_dataset_are_chosen_by_config():
    with tfds.testing.mock_data(num_examples=3):
        examples = tfds_source.tfds_examples(
            _config(tfds_name="cycle_gan/vangogh2photo", split="testA"), 8
        )
    assert examples.ids[0] == "testA-00000"
    assert "vangogh2photo testA[0]" in examples.name(0)


def test_mock_is_deterministic_per_index():
    with tfds.testing.mock_data(num_examples=4):
        a = tfds_source.tfds_examples(_config(), 8)
        b = tfds_source.tfds_examples(_config(), 8)
        np.testing.assert_array_equal(a.image(2), b.image(2))


def test_file_name_and_caption_features_are_used():
    records = [
        {"image": _png(10 * i), "file_name": f"monet_{i}.jpg".encode(), "caption": f"scene {i}"}
        for i in range(3)
    ]
    with tfds.testing.mock_data(as_data_source_fn=_fake_source(records)):
        examples = tfds_source.tfds_examples(_config(), 8)
    assert examples.ids == ("monet_0.jpg", "monet_1.jpg", "monet_2.jpg")
    assert examples.captions == ("scene 0", "scene 1", "scene 2")
    assert examples.image(2)[0, 0, 0] == 20


def test_captions_file_keyed_by_tfds_ids(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(f'{{"trainA-{i:05d}": "caption {i}"}}\n' for i in range(2)))
    with tfds.testing.mock_data(num_examples=3):
        with pytest.raises(ValueError, match="example 'trainA-00002' has no caption"):
            tfds_source.tfds_examples(_config(captions_file=str(path)), 8)
        examples = tfds_source.tfds_examples(
            _config(captions_file=str(path), caption_fallback=True), 8
        )
    assert examples.captions == ("caption 0", "caption 1", "a painting")


def test_corrupt_record_is_named():
    records = [{"image": _png(1)}, {"image": b"\x89PNG broken"}, {"image": _png(2)}]
    with tfds.testing.mock_data(as_data_source_fn=_fake_source(records, with_text=False)):
        examples = tfds_source.tfds_examples(_config(), 8)
    examples.image(0)
    with pytest.raises(
        BadImageError, match=r"'trainA-00001' \(TFDS cycle_gan/monet2photo trainA\[1\]"
    ):
        examples.image(1)


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build cycle_gan/monet2photo"):
        tfds_source.tfds_examples(_config(tfds_data_dir=str(tmp_path)), 8)


def test_fingerprint_names_dataset_version_split_and_count_without_decoding():
    with tfds.testing.mock_data(num_examples=4):
        examples = tfds_source.tfds_examples(_config(), 8)
        fingerprint = examples.fingerprint()
        assert examples.reads == 0
        assert tfds_source.tfds_examples(_config(), 8).fingerprint() == fingerprint
        other_split = tfds_source.tfds_examples(_config(split="testA"), 8).fingerprint()
        view = examples.select(["trainA-00003", "trainA-00001"]).fingerprint()
    source = fingerprint["source"]
    assert (source["name"], source["config"], source["split"]) == (
        "cycle_gan",
        "monet2photo",
        "trainA",
    )
    assert source["num_records"] == 4 and source["version"]
    assert other_split["source"]["split"] == "testA" and other_split != fingerprint
    assert view["source"]["rows_sha256"] != source["rows_sha256"]
    with tfds.testing.mock_data(num_examples=5):
        assert tfds_source.tfds_examples(_config(), 8).fingerprint() != fingerprint


def test_sizes_for_buckets_come_from_the_encoded_header_without_decoding():
    sizes = [(12, 20), (30, 10), (16, 16)]
    records, rng = [], np.random.default_rng(0)
    for h, w in sizes:
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(out, format="PNG")
        data = out.getvalue()
        records.append({"image": data[: len(data) // 2]})  # The header kept, pixels cut.
    with tfds.testing.mock_data(as_data_source_fn=_fake_source(records, with_text=False)):
        examples = tfds_source.tfds_examples(_config(), 8)
        assert [examples.size(i) for i in range(3)] == sizes
        assert examples.reads == 0
        with pytest.raises(BadImageError):  # Decoding the cut record would fail.
            examples.image(0)
