"""benchmarks/step_time.py for one short round on the demo model, so the script does not rot."""

import json
import os
import statistics
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import step_time  # noqa: E402


@pytest.mark.slow  # Three tiny-UNet steps compiled: minutes on a busy 2-core machine.
def test_reports_nsync_against_finetune_at_b_and_2b(tmp_path):
    out = tmp_path / "step_time.json"
    result = step_time.main(["--batch_size=1", "--rounds=2", "--steps=1", f"--output={out}"])
    assert json.loads(out.read_text()) == result
    rounds = result["rounds"]
    assert set(rounds) == {"finetune", "finetune_2b", "nsync", "projection"}
    assert all(len(v) == 2 and min(v) > 0 for v in rounds.values())
    assert result["settings"]["batch_size_per_branch"] == 1
    assert result["settings"]["finetune_2b_batch_size"] == 2
    nsync = statistics.median(rounds["nsync"])
    assert result["finetune_2b_step_s"] == pytest.approx(statistics.median(rounds["finetune_2b"]))
    assert result["nsync_over_finetune_2b"] == pytest.approx(nsync / result["finetune_2b_step_s"])
    assert result["ratio_nsync_over_finetune"] == pytest.approx(
        nsync / statistics.median(rounds["finetune"])
    )
