"""User errors end a launch script with one line `error: ...` and status 2 (`errors.py`).

Each case runs here, in-process, what its launch script runs: `cli.run` around the
script's one library call. (tests/test_cli.py runs the scripts themselves.)
"""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from configs import demo
from nsync_jax import cli, export, negatives, train
from nsync_jax import scope as scope_lib


@pytest.fixture
def launch(monkeypatch, capsys):
    """`launch(main)`: runs `main` as a launch script does, with no flags; returns the exit
    status and the `error: ` lines it printed (after asserting that they are all it
    printed of an error: one line, no traceback)."""
    monkeypatch.setattr(sys, "argv", ["launch.py"])
    monkeypatch.delenv("NSYNC_TRACEBACK", raising=False)

    def run(main):
        with pytest.raises(SystemExit) as exit_info:
            cli.run(main)
        stderr = capsys.readouterr().err
        assert "Traceback" not in stderr, stderr[-3000:]
        lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, stderr[-3000:]
        return exit_info.value.code, lines[0]

    return run


def _paintings_with_a_corrupt_one(root):
    """Three readable images and `bad.png`, all captioned in `metadata.jsonl`."""
    root.mkdir()
    rng = np.random.default_rng(0)
    names = ["a.png", "b.png", "bad.png", "c.png"]
    for name in names:
        if name == "bad.png":
            (root / name).write_bytes(b"\x89PNG\r\n\x1a\n not a png")
        else:
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(root / name)
    lines = [json.dumps({"file_name": n, "text": f"a painting of {n[0]}"}) for n in names]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def _config_on(data_dir):
    config = demo.get_config()
    config.data.source, config.data.path = "folder", str(data_dir)
    return config


def test_corrupt_positive_ends_training_in_one_line(launch, tmp_path):
    _paintings_with_a_corrupt_one(tmp_path / "paintings")
    config = _config_on(tmp_path / "paintings")
    config.train.mode = "finetune"
    config.sample.every = 0  # No samples of the base first: straight to the first batch.
    status, line = launch(lambda argv: train.train(config, str(tmp_path / "run")))
    assert status == 2
    assert os.path.join(str(tmp_path / "paintings"), "bad.png") in line
    assert "data.on_bad_image=skip" in line


def test_corrupt_positive_ends_negative_generation_in_one_line(launch, tmp_path):
    _paintings_with_a_corrupt_one(tmp_path / "paintings")
    config = _config_on(tmp_path / "paintings")
    config.negatives.path = str(tmp_path / "store")
    status, line = launch(lambda argv: negatives.generate_store(config))
    assert status == 2
    assert os.path.join(str(tmp_path / "paintings"), "bad.png") in line
    assert "data.on_bad_image=skip" in line


def test_export_into_a_folder_that_is_not_empty_is_one_line(launch, tmp_path, tiny_sd, save_run):
    config = demo.get_config()
    scope, _, params = scope_lib.make_scope(config.train, *tiny_sd)
    trainable, frozen = scope.split(params)
    workdir = str(tmp_path / "run")
    save_run(workdir, config, trainable, frozen)
    output = tmp_path / "export"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    status, line = launch(lambda argv: export.export_run(workdir, str(output)))
    assert status == 2
    assert f"export directory {output} exists and is not empty" in line
    assert os.listdir(output) == ["notes.txt"]


def _pretrained(name):
    config = demo.get_config()
    config.model.source, config.model.pretrained = "pretrained", name
    return config


def test_missing_base_says_what_was_tried_in_our_words(launch, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # conftest.py sets HF_HUB_OFFLINE=1: the hub client looks in its cache only.
    config = _pretrained("owner/sd-tiny")
    status, line = launch(lambda argv: train.train(config, str(tmp_path / "run")))
    assert status == 2
    assert line == (
        "error: model.pretrained='owner/sd-tiny' is neither a folder nor a hub model: tried "
        f"the folder {tmp_path}/owner/sd-tiny (none there) and the hub id 'owner/sd-tiny' "
        "(not in the local hub cache, and HF_HUB_OFFLINE is set: the hub was not asked)"
    )


def test_unreachable_hub_is_said_in_our_words(launch, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub import errors as hub_errors

    def no_connection(repo_id, **kwargs):  # What the client raises without a network.
        raise hub_errors.LocalEntryNotFoundError(
            "An error happened while trying to locate the files on the Hub and we cannot find "
            "the appropriate snapshot folder for the specified revision on the local disk. "
            "Please check your internet connection and try again."
        )

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.snapshot_download", no_connection)
    monkeypatch.chdir(tmp_path)
    status, line = launch(lambda argv: train.train(_pretrained("owner/sd-tiny"), "run"))
    assert status == 2
    assert line.endswith(
        "and the hub id 'owner/sd-tiny' (not in the local hub cache, and the hub could not "
        "be reached)"
    )
    assert "internet" not in line


def test_invalid_hub_id_is_said_in_our_words(launch, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, line = launch(lambda argv: train.train(_pretrained("owner/sd..tiny"), "run"))
    assert status == 2
    assert line.endswith(
        f"tried the folder {tmp_path}/owner/sd..tiny (none there) and the hub id "
        "'owner/sd..tiny' (not a valid hub id)"
    )
