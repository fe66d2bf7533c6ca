"""Tests of nsync_jax/data/captions.py: captions files, template fallback and its log."""

import json
import logging

import pytest

from configs import default
from nsync_jax.data import captions


def _config(**overrides):
    config = default.get_config().data
    for key, value in overrides.items():
        config[key] = value
    return config


def test_reads_json_and_both_jsonl_forms(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"a": " a cat ", "b": "a dog"}))
    assert captions.read_captions_file(str(path)) == {"a": "a cat", "b": "a dog"}
    lines = tmp_path / "c.jsonl"
    lines.write_text('{"a": "a cat"}\n\n{"file_name": "b", "text": "a dog"}\n')
    assert captions.read_captions_file(str(lines)) == {"a": "a cat", "b": "a dog"}


def test_bad_captions_files_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        captions.read_captions_file(str(tmp_path / "nope.json"))
    lines = tmp_path / "c.jsonl"
    lines.write_text('{"a": "x"}\n{"b": ""}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: caption must be a non-empty string"):
        captions.read_captions_file(str(lines))
    broken = tmp_path / "d.jsonl"
    broken.write_text('{"a": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not JSON"):
        captions.read_captions_file(str(broken))


def test_source_captions_used_when_no_file():
    out = captions.resolve_captions(["a", "b"], ["x", "y"], _config(), "src")
    assert out == ("x", "y")


def test_no_captions_anywhere_uses_template_and_says_so(caplog):
    with caplog.at_level(logging.INFO):
        out = captions.resolve_captions(
            ["a", "b", "c"], [None] * 3, _config(caption_template="a monet"), "TFDS x"
        )
    assert out == ("a monet",) * 3
    assert "TFDS x has none for its 3 examples" in caplog.text and "'a monet'" in caplog.text


def test_partial_source_captions_error_unless_fallback(caplog):
    with pytest.raises(ValueError, match=r"example 'b' has no caption in src metadata \(1 of 2"):
        captions.resolve_captions(["a", "b"], ["x", None], _config(), "src")
    out = captions.resolve_captions(["a", "b"], ["x", None], _config(caption_fallback=True), "src")
    assert out == ("x", "a painting")
    assert "1 of 2 examples have none" in caplog.text


def test_captions_file_overrides_and_missing_id_is_an_error(tmp_path, caplog):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"a": "from file", "zzz": "unused"}))
    config = _config(captions_file=str(path))
    with pytest.raises(ValueError, match=r"example 'b' has no caption in captions file"):
        captions.resolve_captions(["a", "b"], ["x", "y"], config, "src")
    config.caption_fallback = True
    out = captions.resolve_captions(["a", "b"], ["x", "y"], config, "src")
    assert out == ("from file", "a painting")
    assert "1 captions for ids not in src" in caplog.text
