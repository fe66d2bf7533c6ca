"""The paths a user takes, end to end through `launch/*.py`.

A base model folder written by diffusers' and transformers' PyTorch `save_pretrained`
(tiny, in the layout transformers 5 writes and in the hub's older one), positives from a
folder of images of mixed sizes with `metadata.jsonl` and from TFDS, negatives generated
into a store, training in `nsync` mode on it, a SIGTERM mid-run and a resume, sampling,
export loaded by diffusers' PyTorch classes, and evaluation with tiny embedder weights the
test writes.

The README walk-through runs twice: in this process in the default suite (each launch
script run as its command would run it, `tests/launch_in_process.py`: flags, `cli.run`,
exit status, the SIGTERM raised in this process), and as subprocesses, marked slow, as a
user types it. The subprocesses share the JAX compilation cache of the test session. The
scope matrix and the TFDS chain take minutes on two cores and are slow too.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import diffusers
import jax
import launch_in_process
import numpy as np
import pytest
import sd_folders
import torch
from PIL import Image

from nsync_jax import checkpoint, metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 900

CAPTIONS = (
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow ring",
    "a purple cross",
    "a big red square",
    "a small blue circle",
    "a white triangle",
)
# Positives of mixed sizes and aspect ratios, PNG and JPEG, as a user's folder is.
SIZES = ((40, 56), (64, 48), (33, 33), (80, 30), (50, 50), (36, 90), (120, 64), (32, 40))


def _env():
    env = dict(os.environ)
    env.update(
        PYTHONPATH=REPO,
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES="2",  # A small machine: monet.py's batch of 2 divides over it.
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        HF_HUB_OFFLINE="1",
    )
    return env


def _flags(values: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in values.items()]


def launch(script: str, values: dict, expect: int = 0) -> subprocess.CompletedProcess:
    """Runs `launch/<script>.py` with `--key=value` flags; checks its exit status."""
    command = [sys.executable, f"launch/{script}.py", *_flags(values)]
    result = subprocess.run(
        command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == expect, (
        f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-4000:]}"
    )
    return result


def first_save_started(workdir) -> bool:
    """Whether the run in `workdir` has begun writing checkpoint 1 (orbax's temporary
    folder, then `1/`): a signal now stops it a step or two later, well before the end."""
    return bool(glob.glob(os.path.join(checkpoint.checkpoint_dir(workdir), "1*")))


def start_and_signal(values: dict, workdir, sig, log_path):
    """Starts `launch/train.py` in a subprocess; sends `sig` once its first save started.

    Returns:
      (exit status, its stdout and stderr).
    """
    command = [sys.executable, "launch/train.py", *_flags(values)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not first_save_started(workdir):
                assert proc.poll() is None, open(log_path).read()[-4000:]
                assert time.monotonic() < deadline, "no checkpoint in time"
                time.sleep(0.005)
            proc.send_signal(sig)
            rc = proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
    return rc, open(log_path).read()


def train_in_process_until_sigterm(values: dict, workdir):
    """Runs `launch/train.py` in this process and SIGTERMs this process (as a scheduler's
    preemption does) once the first save started.

    Until the run is over, SIGTERM is caught here if the run's own handler is not
    installed, so a signal that comes too late fails the test instead of ending pytest.

    Returns:
      (exit status, stderr and log lines).
    """
    late, done = [], threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: late.append(signum))

    def preempt():
        deadline = time.monotonic() + TIMEOUT
        while not first_save_started(workdir):
            if done.is_set() or time.monotonic() > deadline:
                return
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=preempt, daemon=True)
    thread.start()
    try:
        result = launch_in_process.run("train", values, expect=None)
    finally:
        done.set()
        thread.join()
        signal.signal(signal.SIGTERM, previous)
    assert not late, "SIGTERM came after the run ended: it had no step left to stop at"
    return result.returncode, result.stderr


def write_style_folder(root) -> str:
    """A folder of 8 images of mixed sizes and formats with `metadata.jsonl`."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        for i, ((h, w), caption) in enumerate(zip(SIZES, CAPTIONS, strict=True)):
            name = f"painting_{i}.{'jpg' if i % 3 == 0 else 'png'}"
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, name))
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def style_folder(tmp_path_factory):
    return write_style_folder(tmp_path_factory.mktemp("style"))


@pytest.fixture(scope="module")
def base_t5(tmp_path_factory):
    """A tiny SD folder as transformers 5 / current diffusers `save_pretrained` write it."""
    root = str(tmp_path_factory.mktemp("base-t5"))
    sd_folders.write_pipeline(root, layout="transformers5")
    return root


@pytest.fixture(scope="module")
def base_t4(tmp_path_factory):
    """A tiny SD folder in the hub's SD 1.5 / 2.x layout (transformers 4)."""
    root = str(tmp_path_factory.mktemp("base-t4"))
    sd_folders.write_pipeline(root, layout="transformers4")
    return root


# The stand-ins' overrides of the README's walk-through: the tiny base model's size, a
# global batch that divides over the subprocesses' 2 devices, short samplers.
STAND_IN = {
    "model.resolution": 32,
    "log.every": 1,
    "negatives.scheduler": "ddim",
    "negatives.num_steps": 2,
    "negatives.size": 0,
    "negatives.batch_per_device": 1,
    "sample.scheduler": "ddim",
    "sample.num_steps": 2,
    "sample.batch_per_device": 1,
}


def run_flags(base: str, data: dict, config: str = "configs/monet.py", **overrides) -> dict:
    """The README walk-through's flags (`--config configs/monet.py` with a pretrained
    folder and a data source), plus the stand-ins' overrides and `overrides`."""
    values = {"config": config, "config.model.pretrained": base}
    values.update({f"config.data.{k}": v for k, v in data.items()})
    values.update({f"config.{k}": v for k, v in {**STAND_IN, **overrides}.items()})
    return values


def assert_loads_in_diffusers(export_dir, base, trained_unet=True):
    """The export loads in PyTorch diffusers with every weight found; its UNet differs from
    the base's if it trained (`trained_unet`), else equals it."""
    unet, info = diffusers.UNet2DConditionModel.from_pretrained(
        os.path.join(export_dir, "unet"), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        export_dir, safety_checker=None, requires_safety_checker=False
    )
    base_unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(base, "unet"))
    changed = [
        k
        for k, v in pipe.unet.state_dict().items()
        if not torch.equal(v, base_unet.state_dict()[k])
    ]
    assert bool(changed) == trained_unet
    return pipe


# The walk-through's training run: long enough that a SIGTERM after the first save stops it
# before the end, so the resume has steps left to do.
WALK_THROUGH_STEPS = 4


def readme_walk_through(launch_script, train_until_sigterm, base, style_folder, tmp_path, **sizes):
    """README "Your own data": negatives, training (SIGTERM, resume), sample, export,
    evaluate, on configs/monet.py (textual inversion, cached latents).

    Args:
      launch_script: `(script, {flag: value}) -> result` with `.stderr`; asserts exit 0.
      train_until_sigterm: `({flag: value}, workdir) -> (exit status, log)`.
      base: the pretrained folder.
      style_folder: the positives' folder.
      tmp_path: where the run's files go.
      **sizes: more config overrides of the stand-ins (dotted names).
    """
    store, workdir = tmp_path / "negatives", tmp_path / "run"
    values = run_flags(
        base,
        {"source": "folder", "path": style_folder},
        **{
            "negatives.path": store,
            "train.num_steps": WALK_THROUGH_STEPS,
            "checkpoint.every": 1,
            **sizes,
        },
    )
    result = launch_script("generate_negatives", values)
    assert "complete" in result.stderr
    assert len(open(store / "manifest.jsonl").readlines()) == len(CAPTIONS)

    rc, log = train_until_sigterm({**values, "workdir": workdir}, workdir)
    assert rc == 0, log[-4000:]
    assert "Traceback" not in log
    stopped = checkpoint.latest_step(str(workdir))
    assert f"preempted: saved step {stopped}" in log
    assert 1 <= stopped < WALK_THROUGH_STEPS, f"stopped at {stopped}: no resume to check"
    resumed = launch_script("train", {**values, "workdir": workdir})  # The same command.
    assert f"resuming from step {stopped}" in resumed.stderr
    assert "read only" not in resumed.stderr  # Orbax's note on read-only managers.
    assert checkpoint.latest_step(str(workdir)) == WALK_THROUGH_STEPS
    rows = metrics.read_metrics(str(workdir))
    assert [r["step"] for r in rows] == list(range(1, WALK_THROUGH_STEPS + 1))

    samples = tmp_path / "samples"
    launch_script(
        "sample",
        {
            **values,
            "workdir": workdir,
            "out": samples,
            "prompt": "a red circle in the style of <monet>",
        },
    )
    assert (samples / "grid.png").is_file()

    export_dir = tmp_path / "export"
    result = launch_script("export", {"workdir": workdir, "output": export_dir})
    assert f"exporting step {WALK_THROUGH_STEPS}" in result.stderr
    assert "read only" not in result.stderr
    pipe = assert_loads_in_diffusers(str(export_dir), base, trained_unet=False)
    pipe.load_textual_inversion(str(export_dir))
    assert "<monet>" in pipe.tokenizer.get_vocab()

    clip = sd_folders.tiny_clip(tmp_path / "clip")
    launch_script(
        "evaluate",
        {
            **values,
            "workdir": workdir,
            "config.eval.metrics": "('cmmd',)",
            "config.eval.cmmd_weights": clip,
            "config.eval.real_dir": style_folder,
        },
    )
    report = json.loads((workdir / "eval" / str(WALK_THROUGH_STEPS) / "metrics.json").read_text())
    assert np.isfinite(report["cmmd"]) and report["num_images"] == len(CAPTIONS)


def test_readme_walk_through_in_process(base_t5, style_folder, tmp_path):
    """The walk-through's commands in this process, on a transformers-5 base."""
    readme_walk_through(
        launch_in_process.run,
        train_in_process_until_sigterm,
        base_t5,
        style_folder,
        tmp_path,
        # conftest.py's 8 devices: monet.py's global batch of 2 does not divide over them.
        **{"train.batch_size": 8},
    )


@pytest.mark.slow
def test_readme_walk_through_as_commands(base_t5, style_folder, tmp_path):
    """The walk-through's commands as a user types them, each its own process."""

    def train_until_sigterm(values, workdir):
        return start_and_signal(values, workdir, signal.SIGTERM, tmp_path / "train.log")

    readme_walk_through(launch, train_until_sigterm, base_t5, style_folder, tmp_path)


@pytest.fixture(scope="module")
def t4_store(base_t4, style_folder, tmp_path_factory):
    """Negatives of the style folder from the transformers-4 base, made once."""
    store = tmp_path_factory.mktemp("negatives-t4")
    launch(
        "generate_negatives",
        run_flags(base_t4, {"source": "folder", "path": style_folder}, **{"negatives.path": store}),
    )
    return store


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["unet", "lora", "lora_ti"])
def test_each_scope_trains_on_the_store_and_its_export_loads(
    scope, base_t4, style_folder, t4_store, tmp_path
):
    workdir, export_dir = tmp_path / "run", tmp_path / "export"
    values = run_flags(
        base_t4,
        {"source": "folder", "path": style_folder, "cache_latents": scope != "unet"},
        **{"negatives.path": t4_store, "train.scope": scope, "train.num_steps": 2},
    )
    launch("train", {**values, "workdir": workdir})
    assert checkpoint.latest_step(str(workdir)) == 2
    launch("export", {"workdir": workdir, "output": export_dir})
    if scope == "unet":
        assert_loads_in_diffusers(str(export_dir), base_t4)
        return
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        base_t4, safety_checker=None, requires_safety_checker=False
    )
    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(1, 4, 16, 16, generator=generator),
        torch.tensor([500]),
        torch.randn(1, sd_folders.MAX_LENGTH, sd_folders.TEXT_HIDDEN, generator=generator),
    )
    with torch.no_grad():
        before = pipe.unet(*inputs).sample
    if scope == "lora_ti":
        pipe.load_textual_inversion(str(export_dir))
        assert "<monet>" in pipe.tokenizer.get_vocab()
    pipe.load_lora_weights(str(export_dir), weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        after = pipe.unet(*inputs).sample
    assert not torch.allclose(before, after, rtol=0, atol=1e-7)  # The trained adapters act.


TFDS_WRAPPER = """
import runpy, sys
import tensorflow_datasets as tfds
script, *flags = sys.argv[1:]
sys.argv = [script, *flags]
with tfds.testing.mock_data(num_examples=4):
    runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.slow
def test_tfds_positives_through_generate_negatives_and_train(base_t4, tmp_path):
    """`data.source=tfds` as configs/monet.py has it, the set mocked by `tfds.testing.mock_data`
    inside the launch scripts' own processes."""
    store, workdir = tmp_path / "negatives", tmp_path / "run"
    values = run_flags(
        base_t4,
        {"tfds_data_dir": tmp_path / "tfds"},
        **{"negatives.path": store, "train.num_steps": 2},
    )
    for script, extra in (("generate_negatives", {}), ("train", {"workdir": workdir})):
        command = [
            sys.executable,
            "-c",
            TFDS_WRAPPER,
            f"launch/{script}.py",
            *_flags({**values, **extra}),
        ]
        result = subprocess.run(
            command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
        )
        assert result.returncode == 0, result.stderr[-4000:]
    assert len(open(store / "manifest.jsonl").readlines()) == 4
    assert checkpoint.latest_step(str(workdir)) == 2
