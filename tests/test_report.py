"""launch/report.py's page: every logged metric charted, sample grids, the config."""

import json
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from nsync_jax import errors, metrics, previews, report


def _run_folder(tmp_path):
    workdir = str(tmp_path)
    writer = metrics.MetricWriter(workdir, enabled=True)
    names = ("loss_pos", "loss_neg", "cosine", "coefficient", "grad_norm_pos", "steps_per_s")
    for step in (10, 20, 30):
        writer.write(step, {name: step / (i + 1) for i, name in enumerate(names)})
    writer.write(40, {"loss_pos": 0.5, "an_odd_metric": float("nan")})
    writer.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"train": {"mode": "nsync", "note": "<b>escaped</b>"}}, f)
    samples = os.path.join(workdir, previews.SAMPLES_DIR)
    os.makedirs(samples)
    with open(os.path.join(samples, previews.INDEX_FILE), "w") as f:
        for step in (0, 20):
            path = previews.grid_path(workdir, step)
            Image.fromarray(np.full((8, 8, 3), step, np.uint8)).save(path)
            record = {"step": step, "file": os.path.basename(path), "seconds": 1.5}
            f.write(json.dumps({**record, "prompts": ["p"]}) + "\n")
    return workdir, names


def test_report_names_every_metric_and_embeds_the_samples(tmp_path):
    workdir, names = _run_folder(tmp_path)
    path = report.write_report(workdir)
    assert path == os.path.join(workdir, report.REPORT_FILE)
    with open(path) as f:
        page = f.read()
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    for svg in svgs:
        ET.fromstring(svg)  # Well-formed.
    charted = " ".join(svgs)
    for name in names:
        assert f">{name}</text>" in charted, name
    # A metric with no finite value is named, not drawn.
    assert "an_odd_metric" in page
    assert [t for t, _ in report.GROUPS if f">{t}</text>" in charted] == [
        "Losses",
        "NSYNC projection",
        "Gradient norms",
        "Throughput",
    ]
    assert page.count("data:image/png;base64,") == 2
    assert "step 20 (1.5 s)" in page
    assert "&lt;b&gt;escaped&lt;/b&gt;" in page and "<b>escaped</b>" not in page


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(errors.NotFound, match="metrics.jsonl"):
        report.write_report(str(tmp_path))
