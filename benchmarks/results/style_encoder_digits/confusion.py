"""Ad-hoc control for results/style_encoder_digits: which class the scorer gives the images
of stages 2, 3 and the slice ablation, per reference style, regenerated from the run's
checkpoints in /tmp/se2-small (not kept). Wrote confusion.json.

    PYTHONPATH=. nice -n 10 python benchmarks/results/style_encoder_digits/confusion.py
"""

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
sys.path.insert(0, os.path.join(os.path.abspath(ROOT), "benchmarks"))
import style_encoder_benchmark as d  # noqa: E402
import style_family as sf  # noqa: E402

RUN = "/tmp/se2-small"
p = argparse.Namespace(
    train_per_style=32,
    refs=4,
    steps_per_batch=200,
    stage2_epochs=100,
    stage3_epochs=50,
    ti_steps=500,
    out=RUN,
    base=d.DEFAULT_BASE,
    data_seed=0,
    eval_styles=[0, 4],
    seeds=[0, 1, 2],
)
data = d.make_data("/tmp/se2-confusion-data", p)
scorer = sf.StyleScorer(8)
base = d.Base(p.base)
jobs = d.eval_jobs(data["refs"], p.eval_styles)
pixels = np.stack([data["refs"][k][0][r] for k, r, _ in jobs])
labels = np.asarray([digit for _, _, digit in jobs])
styles = np.asarray([k for k, _, _ in jobs])
names = [s.name for s in sf.STYLES] + ["plain"]
width = base.model.text_encoder.config.hidden_size
out = {}
for seed in p.seeds:
    for method, head, workdir in (
        ("stage3", "linear", f"seed{seed}"),
        ("stage3-slice", "slice", f"seed{seed}-slice"),
        ("stage2", "linear", f"seed{seed}"),
    ):
        stage = 2 if method == "stage2" else 3
        where = os.path.join(RUN, "runs", workdir)
        tokens = d.encoder_tokens(where, stage, head, p, seed, pixels, width)
        prediction = scorer.predict(base.generate(tokens, labels, seed))
        row = {}
        for k in p.eval_styles:
            counts = np.bincount(prediction[styles == k], minlength=len(names))
            row[f"reference style {k}"] = {
                n: int(c) for n, c in zip(names, counts, strict=True) if c
            }
        row["token_rms"] = float(np.sqrt(np.mean(tokens**2)))
        row["token_spread_over_references"] = float(np.std(tokens, axis=0).mean())
        out[f"{method} seed{seed}"] = row
        print(method, seed, row, flush=True)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "confusion.json"), "w") as f:
    json.dump(out, f, indent=1)
