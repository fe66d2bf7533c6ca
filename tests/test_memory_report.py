"""benchmarks/memory.py at a tiny size, so that the report does not rot: it compiles the
training step ahead of time on 8 fake CPU devices and reads memory and FLOPs from it.

Marked slow (`pytest -m slow tests/test_memory_report.py`). Run as a subprocess: the
script sets its own device count and XLA flags before JAX starts.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report(output, only, *extra):
    command = [sys.executable, "benchmarks/memory.py", "--arch", "tiny", "--resolution", "64"]
    command += ["--only", only, "--output", str(output), *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MEMORY_DEVICES")}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output) as f:
        return json.load(f), result.stdout


@pytest.mark.slow  # Two processes that each compile twice: minutes on two cores.
def test_report_rows_and_append(tmp_path):
    output = tmp_path / "memory.json"
    first, stdout = _report(output, "unet,nsync,fsdp8,none,1")
    assert "UNet forward, one 64px image" in stdout and "| unet | nsync | fsdp8 | none |" in stdout
    (row,) = first["rows"]
    assert first["devices"] == 8 and first["unet_forward_tflops_per_image"] > 0
    assert row["peak_gib"] > row["argument_gib"] > 0 and row["tflops_per_step_per_device"] > 0
    # NSYNC runs two branches: at least two UNet forwards and backwards per device-batch.
    assert row["tflops_per_step_per_device"] > 2 * first["unet_forward_tflops_per_image"]

    second, _ = _report(output, "unet,nsync,fsdp8,blocks,1", "--append")
    none, blocks = second["rows"]
    assert none == row  # Kept as it was.
    # Recomputing the blocks in the backward pass costs FLOPs.
    assert blocks["remat"] == "blocks"
    assert blocks["tflops_per_step_per_device"] > none["tflops_per_step_per_device"]


@pytest.mark.slow
def test_accumulation_row_holds_one_micro_batch(tmp_path):
    """`nsync_accum4` at batch 4 (4 micro-batches of 1) plans less than batch 4 at once,
    and its FLOPs are the scan body's times 4 (XLA counts a loop body once)."""
    report, _ = _report(
        tmp_path / "memory.json", "unet,nsync,fsdp8,none,4;unet,nsync_accum4,fsdp8,none,4"
    )
    whole, accumulated = report["rows"]
    assert accumulated["temp_gib"] < whole["temp_gib"]
    assert accumulated["tflops_scaled_by_grad_accum"] == 4
    ratio = accumulated["tflops_per_step_per_device"] / whole["tflops_per_step_per_device"]
    assert 0.9 < ratio < 1.1
