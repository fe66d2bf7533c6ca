"""The launch scripts' handling of a newcomer's mistakes: one line naming the thing.

Every mistake must end with status 2 and an `error: ...` line on stderr that names what is
wrong, with no traceback into library internals. The mistakes run each script in this
process (`tests/launch_in_process.py`: its flags, `cli.run`, its exit status); one mistake
per script runs as a real command, all at once (most of their time is importing JAX and
the model libraries), to check what only a fresh process shows: that the script starts as
a program, and that JAX's backend probes and the Flax deprecation notices stay quiet.
"""

import os
import subprocess
import sys

import jax.numpy as jnp
import launch_in_process
import numpy as np
import pytest
from PIL import Image

from configs import demo
from nsync_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_SCRIPTS = sorted(name[:-3] for name in os.listdir(os.path.join(REPO, "launch")))


def _env():
    env = dict(os.environ)
    env.update(PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    # As a user's machine: JAX probes every platform (and used to log each failure at INFO).
    env.pop("JAX_PLATFORMS", None)
    env.pop("NSYNC_TRACEBACK", None)
    return env


def _command(script, values):
    return [sys.executable, f"launch/{script}.py", *(f"--{k}={v}" for k, v in values.items())]


@pytest.fixture
def changed_config_workdir(tmp_path, save_run):
    """A workdir whose checkpoint was written with the demo config (train.scope=unet)."""
    workdir = str(tmp_path / "run")
    trainable = {"w": jnp.zeros((2, 2))}
    save_run(workdir, demo.get_config(), trainable, {"f": jnp.ones((2,))})
    return workdir


def _mistakes(tmp_path, changed_config_workdir):
    """{name: (script, flags, what the error line must name)}."""
    no_metadata = tmp_path / "paintings"
    no_metadata.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(no_metadata / "a.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    demo_run = {"config": "configs/demo.py", "workdir": tmp_path / "w"}
    return {
        "model path": (
            "train",
            {
                **demo_run,
                "config.model.source": "pretrained",
                "config.model.pretrained": "models/sd-tiny",
            },
            "models/sd-tiny",
        ),
        "folder without metadata.jsonl": (
            "train",
            {
                **demo_run,
                "config.train.mode": "finetune",
                "config.data.source": "folder",
                "config.data.path": no_metadata,
            },
            "metadata.jsonl",
        ),
        "unprepared TFDS set": (
            "train",
            {
                **demo_run,
                "config.train.mode": "finetune",
                "config.data.source": "tfds",
                "config.data.tfds_data_dir": empty,
            },
            "cycle_gan/monet2photo",
        ),
        "resolution": ("train", {**demo_run, "config.model.resolution": 62}, "model.resolution"),
        "config field typo": ("train", {**demo_run, "config.data.paht": "x"}, "'paht'"),
        "changed config on resume": (
            "train",
            {**demo_run, "workdir": changed_config_workdir, "config.train.scope": "lora"},
            "train.scope",
        ),
        "nsync without a store": (
            "train",
            {**demo_run, "config.data.source": "folder", "config.data.path": no_metadata},
            "negatives.source=store",
        ),
        "config file": ("train", {**demo_run, "config": "configs/nope.py"}, "configs/nope.py"),
        "EMA weights of a run that kept none": (
            "export",
            {"workdir": changed_config_workdir, "output": tmp_path / "ema", "weights": "ema"},
            "kept no EMA",
        ),
        "export without a checkpoint": (
            "export",
            {"workdir": empty, "output": tmp_path / "export"},
            "no checkpoints",
        ),
        "sample without a checkpoint": (
            "sample",
            {"config": "configs/demo.py", "workdir": empty, "out": tmp_path / "s", "prompt": "a"},
            "no checkpoints",
        ),
        "evaluate without a checkpoint": (
            "evaluate",
            {"config": "configs/demo.py", "workdir": empty},
            "no checkpoints",
        ),
        "negatives of a folder without metadata.jsonl": (
            "generate_negatives",
            {
                "config": "configs/demo.py",
                "config.data.source": "folder",
                "config.data.path": no_metadata,
                "config.negatives.path": tmp_path / "store",
            },
            "metadata.jsonl",
        ),
        "report of a folder that is no run": ("report", {"workdir": empty}, "metrics.jsonl"),
        "style encoder config typo": (
            "train_style_encoder",
            {
                "config": "configs/style_encoder_tiny.py",
                "workdir": tmp_path / "se",
                "config.stag": 1,
            },
            "'stag'",
        ),
        "style encoder export without a run": (
            "export_style_encoder",
            {"workdir": empty, "output": tmp_path / "se-export"},
            str(empty),
        ),
    }


# The mistake each script makes as a command: one that fails before anything is built.
AS_COMMANDS = (
    "config file",  # train
    "export without a checkpoint",
    "sample without a checkpoint",
    "evaluate without a checkpoint",
    "negatives of a folder without metadata.jsonl",
    "report of a folder that is no run",
    "style encoder config typo",
    "style encoder export without a run",
)


def _check(name, returncode, stderr, wanted):
    """What is wrong with a mistake's ending, or None."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    if returncode != 2 or "Traceback" in stderr or not lines or wanted not in lines[-1]:
        return f"{name}: exit {returncode}, stderr ends:\n{stderr[-1500:]}"
    return None


def test_mistakes_end_in_one_line_naming_the_thing(tmp_path, changed_config_workdir):
    failures = []
    for name, (script, values, wanted) in _mistakes(tmp_path, changed_config_workdir).items():
        result = launch_in_process.run(script, values, expect=None)
        failures.append(_check(name, result.returncode, result.stderr, wanted))
    failures = [f for f in failures if f]
    assert not failures, "\n\n".join(failures)


def test_each_script_as_a_command_ends_a_mistake_in_one_line(tmp_path, changed_config_workdir):
    """One mistake per launch script, as real processes: the error line, and neither JAX's
    backend probes nor the Flax deprecation notices in the output."""
    mistakes = _mistakes(tmp_path, changed_config_workdir)
    assert sorted(mistakes[name][0] for name in AS_COMMANDS) == LAUNCH_SCRIPTS
    procs = {
        name: subprocess.Popen(
            _command(*mistakes[name][:2]),
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in AS_COMMANDS
    }
    failures = []
    for name, proc in procs.items():
        try:
            _, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            failures.append(f"{name}: hung")
            continue
        failures.append(_check(name, proc.returncode, stderr, mistakes[name][2]))
        if "Unable to initialize backend" in stderr:
            failures.append(f"{name}: JAX's backend probes are logged:\n{stderr[-1500:]}")
        if "Flax classes are deprecated" in stderr:  # Also logged on import.
            failures.append(f"{name}: the Flax deprecation notices show:\n{stderr[-1500:]}")
    failures = [f for f in failures if f]
    assert not failures, "\n\n".join(failures)


def test_nsync_traceback_shows_the_traceback_of_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NSYNC_TRACEBACK", "1")
    with pytest.raises(errors.NotFound, match="no checkpoints"):
        launch_in_process.run("export", {"workdir": tmp_path, "output": tmp_path / "out"})


def test_library_imports_install_no_log_filters_and_setup_logging_does():
    code = """
import logging
from nsync_jax import checkpoint, cli, models

def filters():
    return len(logging.getLogger("absl").filters)

assert filters() == 0, filters()
cli.setup_logging()
assert filters() == 1, filters()
"""
    env = {**_env(), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
