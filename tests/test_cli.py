"""The launch scripts' handling of a newcomer's mistakes: one line naming the thing.

Each mistake runs the real `launch/*.py` in a subprocess (all at once: most of their time
is importing JAX and the model libraries) and must end with status 2 and an `error: ...`
line on stderr that names what is wrong, with no traceback into library internals.
"""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_mistakes_end_in_one_line_naming_the_thing(tmp_path, changed_config_workdir):
    no_metadata = tmp_path / "paintings"
    no_metadata.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(no_metadata / "a.png")
    (tmp_path / "empty").mkdir()
    demo_run = {"config": "configs/demo.py", "workdir": tmp_path / "w"}
    cases = {
        # (script, flags): what the error line must name.
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
                "config.data.tfds_data_dir": tmp_path / "empty",
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
        "config file": (
            "train",
            {**demo_run, "config": "configs/nope.py"},
            "configs/nope.py",
        ),
        "EMA weights of a run that kept none": (
            "export",
            {"workdir": changed_config_workdir, "output": tmp_path / "ema", "weights": "ema"},
            "kept no EMA",
        ),
        "export without a checkpoint": (
            "export",
            {"workdir": tmp_path / "empty", "output": tmp_path / "export"},
            "no checkpoints",
        ),
    }
    procs = {
        name: subprocess.Popen(
            _command(script, values),
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (script, values, _) in cases.items()
    }
    failures = []
    for name, proc in procs.items():
        try:
            _, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            failures.append(f"{name}: hung")
            continue
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        wanted = cases[name][2]
        if proc.returncode != 2 or "Traceback" in stderr or not errors or wanted not in stderr:
            failures.append(f"{name}: exit {proc.returncode}, stderr ends:\n{stderr[-1500:]}")
        elif "Unable to initialize backend" in stderr:
            failures.append(f"{name}: JAX's backend probes are logged:\n{stderr[-1500:]}")
        elif "Flax classes are deprecated" in stderr:  # Also logged on import.
            failures.append(f"{name}: the Flax deprecation notices show:\n{stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)


def test_nsync_traceback_shows_the_traceback_of_a_user_error(tmp_path):
    env = {**_env(), "NSYNC_TRACEBACK": "1"}
    command = _command("export", {"workdir": tmp_path, "output": tmp_path / "out"})
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "no checkpoints" in result.stderr


def test_library_imports_install_no_log_filters_and_setup_logging_does():
    code = """
import logging
import diffusers.utils.logging as dlog
from nsync_jax import checkpoint, cli, models

def filters():
    handler = [f for h in dlog.get_logger().handlers for f in h.filters]
    return len(handler), len(logging.getLogger("absl").filters)

assert filters() == (0, 0), filters()
cli.setup_logging()
assert filters() == (1, 1), filters()
"""
    env = {**_env(), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
