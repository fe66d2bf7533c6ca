"""Tests of nsync_jax/data/folder.py on small image folders the tests write."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from configs import default
from nsync_jax.data import folder
from nsync_jax.data.examples import BadImageError


def _write_folder(root, metadata=True, missing_caption=False, corrupt=False, absent=False):
    rng = np.random.default_rng(0)
    names = ["a.png", "b.jpg", "sub/c.png"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), np.uint8)).save(root / name)
    lines = [{"file_name": n, "text": f"caption of {n}"} for n in names]
    if corrupt:
        (root / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        lines.append({"file_name": "bad.jpg", "text": "a broken one"})
    if absent:
        lines.append({"file_name": "gone.png", "text": "never written"})
    if missing_caption:
        del lines[1]["text"]
    if metadata:
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return names


def _config(root, **overrides):
    config = default.get_config().data
    config.source = "folder"
    config.path = str(root)
    for key, value in overrides.items():
        config[key] = value
    return config


def test_metadata_gives_ids_and_captions_and_reads_lazily(tmp_path):
    names = _write_folder(tmp_path)
    examples = folder.folder_examples(_config(tmp_path), 16)
    assert examples.ids == tuple(names)
    assert examples.captions[2] == "caption of sub/c.png"
    assert examples.reads == 0
    image = examples.image(1)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8 and examples.reads == 1


def test_corrupt_image_is_named_when_read(tmp_path):
    _write_folder(tmp_path, corrupt=True)
    examples = folder.folder_examples(_config(tmp_path), 16)
    with pytest.raises(BadImageError, match=r"'bad.jpg' \(.*bad.jpg\)"):
        examples.image(3)


def test_missing_caption_is_an_error_naming_it_or_the_template(tmp_path, caplog):
    _write_folder(tmp_path, missing_caption=True)
    with pytest.raises(ValueError, match=r"example 'b.jpg' has no caption"):
        folder.folder_examples(_config(tmp_path), 16)
    examples = folder.folder_examples(
        _config(tmp_path, caption_fallback=True, caption_template="a sketch"), 16
    )
    assert examples.captions == ("caption of a.png", "a sketch", "caption of sub/c.png")
    assert "1 of 3 examples have none" in caplog.text


def test_listed_but_absent_file_errors_or_is_skipped(tmp_path, caplog):
    _write_folder(tmp_path, absent=True)
    with pytest.raises(FileNotFoundError, match="'gone.png'"):
        folder.folder_examples(_config(tmp_path), 16)
    with caplog.at_level(logging.WARNING):
        examples = folder.folder_examples(_config(tmp_path, on_bad_image="skip"), 16)
    assert "gone.png" not in examples.ids and len(examples) == 3
    assert "skipping 1 files listed" in caplog.text


def test_without_metadata_is_an_error_unless_the_template_is_asked_for(tmp_path):
    _write_folder(tmp_path, metadata=False)
    with pytest.raises(FileNotFoundError, match="has no metadata.jsonl.*caption_fallback"):
        folder.folder_examples(_config(tmp_path), 8)


def test_without_metadata_every_image_with_the_template(tmp_path, caplog):
    names = _write_folder(tmp_path, metadata=False)
    (tmp_path / "notes.txt").write_text("not an image")
    examples = folder.folder_examples(_config(tmp_path, caption_fallback=True), 8)
    assert examples.ids == tuple(sorted(names))
    assert set(examples.captions) == {"a painting"}
    assert "has none for its 3 examples" in caplog.text


def test_captions_file_keyed_by_file_name(tmp_path):
    names = _write_folder(tmp_path, metadata=False)
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({n: f"file caption {i}" for i, n in enumerate(names)}))
    examples = folder.folder_examples(_config(tmp_path, captions_file=str(path)), 8)
    assert examples.captions[examples.ids.index("b.jpg")] == "file caption 1"


def test_bad_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        folder.folder_examples(_config(tmp_path / "nowhere"), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        folder.folder_examples(_config(tmp_path / "empty"), 8)


def test_without_metadata_warns_how_to_add_captions(tmp_path, caplog):
    _write_folder(tmp_path, metadata=False)
    with caplog.at_level(logging.WARNING):
        folder.folder_examples(_config(tmp_path, caption_fallback=True), 8)
    warning = next(r for r in caplog.records if "metadata.jsonl" in r.getMessage())
    assert warning.levelno == logging.WARNING
    assert "uncaptioned" in warning.getMessage() and '"file_name"' in warning.getMessage()


def test_fingerprint_reads_no_image_and_sees_file_and_caption_changes(tmp_path):
    _write_folder(tmp_path)
    examples = folder.folder_examples(_config(tmp_path), 16)
    fingerprint = examples.fingerprint()
    assert examples.reads == 0
    assert fingerprint["source"]["kind"] == "folder"
    assert folder.folder_examples(_config(tmp_path), 16).fingerprint() == fingerprint
    # Touched or copied elsewhere (same bytes, other time): the same data.
    os.utime(tmp_path / "a.png", ns=(1, 10**18))
    touched = folder.folder_examples(_config(tmp_path), 16).fingerprint()
    assert touched == fingerprint
    # Rewritten with other pixels.
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "b.jpg")
    rewritten = folder.folder_examples(_config(tmp_path), 16).fingerprint()
    assert rewritten != touched
    # A caption changed in metadata.jsonl.
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("caption of a.png", "a harbour"))
    recaptioned = folder.folder_examples(_config(tmp_path), 16).fingerprint()
    assert recaptioned["ids_and_captions_sha256"] != rewritten["ids_and_captions_sha256"]
    assert recaptioned["source"] == rewritten["source"]


def test_fingerprint_sees_an_image_added_or_removed(tmp_path):
    _write_folder(tmp_path, metadata=False)
    config = _config(tmp_path, caption_fallback=True)
    before = folder.folder_examples(config, 8).fingerprint()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "d.png")
    added = folder.folder_examples(config, 8).fingerprint()
    assert added != before and added["num_examples"] == 4
    os.remove(tmp_path / "d.png")
    assert folder.folder_examples(config, 8).fingerprint() == before
