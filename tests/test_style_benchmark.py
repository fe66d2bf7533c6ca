"""The style benchmark's bookkeeping: intervals, parts that resume and merge, settings."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import sklearn  # noqa: E402, F401  (the digits; the test extra: fail, never skip)
import style_benchmark  # noqa: E402


def test_interval_is_the_t_interval_of_the_mean():
    mean, std, half = style_benchmark.mean_std_interval([1.0, 2.0, 3.0])
    assert (mean, std) == (2.0, 1.0)
    np.testing.assert_allclose(half, 4.302653 / np.sqrt(3), rtol=1e-6)  # t(0.975, 2).
    assert style_benchmark.mean_std_interval([0.5]) == (0.5, 0.0, 0.0)


def test_parts_merge_by_method_scope_and_seed(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    for key, seed in (("nsync-paper-k4 (textual_inversion)", 1), ("finetune (unet)", 0)):
        path = style_benchmark.part_path(str(parts), key, seed)
        with open(path, "w") as f:
            json.dump({"seed": seed, "key": key}, f)
    path = style_benchmark.part_path(str(parts), "nsync-paper-k4 (textual_inversion)", 0)
    with open(path, "w") as f:
        json.dump({"seed": 0, "key": "nsync-paper-k4 (textual_inversion)"}, f)
    merged = style_benchmark.collect_parts(str(tmp_path))
    assert list(merged) == ["finetune (unet)", "nsync-paper-k4 (textual_inversion)"]
    assert [r["seed"] for r in merged["nsync-paper-k4 (textual_inversion)"]] == [0, 1]
    assert all(r["key"] == k for k, runs in merged.items() for r in runs)


def test_parts_of_another_setting_do_not_merge(tmp_path):
    setting = {"steps": 400, "base_fingerprint": "abc"}
    style_benchmark.check_setting(str(tmp_path), setting)
    style_benchmark.check_setting(str(tmp_path), dict(setting))  # The same: fine.
    with pytest.raises(SystemExit, match="base_fingerprint"):
        style_benchmark.check_setting(str(tmp_path), {**setting, "base_fingerprint": "abd"})


@pytest.mark.slow
def test_a_cut_run_resumes_from_its_parts(tmp_path):
    """Micro sizes, two sittings: the second adds a seed and reruns nothing finished."""
    import matplotlib  # noqa: F401  (the plots; in the test extra: fail, never skip)

    base = [sys.executable, os.path.join(ROOT, "benchmarks", "style_benchmark.py")]
    flags = "--base_steps 20 --steps 2 --per_class 1 --evals 2 --style_count 16"
    flags += f" --methods finetune --scopes unet --cache {tmp_path}/c --out {tmp_path}/o"
    env = {**os.environ, "PYTHONPATH": ROOT}
    for seeds in (1, 2):
        subprocess.run([*base, *flags.split(), "--seeds", str(seeds)], check=True, env=env)
        with open(tmp_path / "o" / "results.json") as f:
            record = json.load(f)
        assert [r["seed"] for r in record["runs"]["finetune (unet)"]] == list(range(seeds))
    first, second = record["sittings"]
    part = tmp_path / "o" / "parts" / "finetune_unet_seed0.json"
    assert os.path.getmtime(part) < os.path.getmtime(
        tmp_path / "o" / "parts" / "finetune_unet_seed1.json"
    )
    assert (
        len(record["base_fingerprint"]) == 64 and first["command"] == second["command"][:-1] + "1"
    )
