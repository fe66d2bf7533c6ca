"""benchmarks/throughput.py at a tiny size on CPU, so the script does not rot."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import throughput  # noqa: E402


def _run(tmp_path, resolution: int, modes: str) -> tuple[dict, dict]:
    out = tmp_path / "throughput.json"
    result = throughput.main(
        [
            "--arch=tiny",
            f"--resolution={resolution}",
            f"--modes={modes}",
            "--batch=1",
            "--steps=2",
            "--warmup=1",
            "--devices=1",
            "--compute_dtype=float32",
            f"--output={out}",
        ]
    )
    assert out.exists()
    rows = {row["mode"]: row for row in result["rows"]}
    assert set(rows) == set(modes.split(","))
    for row in rows.values():
        assert row["step_s"]["p50"] > 0 and math.isfinite(row["images_per_s"])
        assert row["flops_per_step"] > 0 and math.isfinite(row["final_loss_pos"])
    assert rows["finetune"]["pairs_per_s"] is None
    # Two branches with a backward each: about twice the fine-tuning FLOPs.
    ratio = rows["nsync"]["flops_per_step"] / rows["finetune"]["flops_per_step"]
    assert 1.7 < ratio < 2.3  # Per-step costs outside the UNet (optimizer) are counted once.
    devices = result["settings"]["devices"]
    assert rows["nsync"]["images_per_s"] == pytest.approx(
        2 * devices / rows["nsync"]["step_s"]["mean"]
    )
    return result, rows


def test_tiny_run_reports_finetune_and_nsync(tmp_path):
    _run(tmp_path, 32, "finetune,nsync")


@pytest.mark.slow
def test_tiny_run_reports_every_mode(tmp_path):
    result, rows = _run(tmp_path, 64, "finetune,nsync,nsync_every4")
    devices = result["settings"]["devices"]
    assert rows["nsync_every4"]["images_per_s"] == pytest.approx(
        1.25 * devices / rows["nsync_every4"]["step_s"]["mean"]
    )
