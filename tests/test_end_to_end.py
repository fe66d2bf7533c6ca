"""The paths a user takes, end to end through `launch/*.py` run as subprocesses.

A base model folder written by diffusers' and transformers' PyTorch `save_pretrained`
(tiny, in the layout transformers 5 writes and in the hub's older one), positives from a
folder of images of mixed sizes with `metadata.jsonl` and from TFDS, negatives generated
into a store, training in `nsync` mode on it, a SIGTERM mid-run and a resume, sampling,
export loaded by diffusers' PyTorch classes, and evaluation with tiny embedder weights the
test writes. Every subprocess shares the JAX compilation cache of the test session.

The one chain of every launch script is in the default suite; the scope matrix and the
TFDS chain take minutes on two cores and are marked slow.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from nsync_jax import checkpoint, metrics

sd_folders = pytest.importorskip("sd_folders")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

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


def start_and_signal(values: dict, workdir, sig, after_step: int, log_path):
    """Starts `launch/train.py`, sends `sig` once checkpoint `after_step` exists."""
    command = [sys.executable, "launch/train.py", *_flags(values)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not os.path.isdir(checkpoint.step_dir(workdir, after_step)):
                assert proc.poll() is None, open(log_path).read()[-4000:]
                assert time.monotonic() < deadline, "no checkpoint in time"
                time.sleep(0.05)
            proc.send_signal(sig)
            rc = proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
    return rc, open(log_path).read()


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


def test_readme_walk_through_on_a_folder_and_a_save_pretrained_checkpoint(
    base_t5, style_folder, tmp_path
):
    """README "Your own data": negatives, training (SIGTERM, resume), sample, export, evaluate,
    on configs/monet.py (textual inversion, cached latents) with a transformers-5 base."""
    store, workdir = tmp_path / "negatives", tmp_path / "run"
    values = run_flags(
        base_t5,
        {"source": "folder", "path": style_folder},
        **{"negatives.path": store, "train.num_steps": 4, "checkpoint.every": 1},
    )
    result = launch("generate_negatives", values)
    assert "complete" in result.stderr
    assert len(open(store / "manifest.jsonl").readlines()) == len(CAPTIONS)

    rc, log = start_and_signal(
        {**values, "workdir": workdir}, workdir, signal.SIGTERM, 1, tmp_path / "train.log"
    )
    assert rc == 0, log[-4000:]
    assert "Traceback" not in log
    stopped = checkpoint.latest_step(str(workdir))
    assert f"preempted: saved step {stopped}" in log
    if stopped < 4:
        resumed = launch("train", {**values, "workdir": workdir})
        assert f"resuming from step {stopped}" in resumed.stderr
        assert "read only" not in resumed.stderr  # Orbax's note on read-only managers.
    assert checkpoint.latest_step(str(workdir)) == 4
    assert [r["step"] for r in metrics.read_metrics(str(workdir))] == [1, 2, 3, 4]

    samples = tmp_path / "samples"
    launch(
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
    result = launch("export", {"workdir": workdir, "output": export_dir})
    assert "exporting step 4" in result.stderr
    assert "read only" not in result.stderr
    pipe = assert_loads_in_diffusers(str(export_dir), base_t5, trained_unet=False)
    pipe.load_textual_inversion(str(export_dir))
    assert "<monet>" in pipe.tokenizer.get_vocab()

    clip = sd_folders.tiny_clip(tmp_path / "clip")
    launch(
        "evaluate",
        {
            **values,
            "workdir": workdir,
            "config.eval.metrics": "('cmmd',)",
            "config.eval.cmmd_weights": clip,
            "config.eval.real_dir": style_folder,
        },
    )
    report = json.loads((workdir / "eval" / "4" / "metrics.json").read_text())
    assert np.isfinite(report["cmmd"]) and report["num_images"] == len(CAPTIONS)


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
