"""One HTML page for a run: `python launch/report.py --workdir W` writes `W/report.html`.

The page stands alone (charts are inline SVG, sample grids embedded as PNG data), so it
can be opened or shared as one file: the metric curves of `metrics.jsonl` in groups
(losses of both branches, NSYNC's cosine and coefficient, gradient norms, throughput, and
every other metric the run logged), the sample grids of `samples/` over steps, and the
run's `config.json`. Nothing but the standard library and what training wrote.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Sequence

from nsync_jax import errors, metrics, previews

REPORT_FILE = "report.html"
# (title, does a metric name belong here): a metric goes to the first group that takes it.
GROUPS = (
    ("Losses", lambda n: n.startswith("loss") or n.startswith("val_")),
    ("NSYNC projection", lambda n: n in ("cosine", "coefficient")),
    ("Gradient norms", lambda n: "norm" in n),
    ("Throughput", lambda n: n in ("steps_per_s", "images_per_s")),
    ("Other metrics", lambda n: True),
)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")
WIDTH, HEIGHT, PAD = 640, 260, 48


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high == low:
        return [low]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def svg_chart(title: str, series: dict[str, Sequence[tuple[int, float]]]) -> str:
    """A line chart of `series` (name -> (step, value) points) as an inline SVG."""
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    if not points:
        return f"<p>{html.escape(title)}: no finite values</p>"
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def xy(step: float, value: float) -> tuple[float, float]:
        x = PAD + (step - x0) / (x1 - x0) * (WIDTH - 2 * PAD)
        y = HEIGHT - PAD - (value - y0) / (y1 - y0) * (HEIGHT - 2 * PAD)
        return x, y

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" font-weight="bold">'
        f"{html.escape(title)}</text>",
        f'<rect x="{PAD}" y="{PAD}" width="{WIDTH - 2 * PAD}" height="{HEIGHT - 2 * PAD}" '
        'fill="none" stroke="#999"/>',
    ]
    for value in _ticks(y0, y1):
        _, y = xy(x0, value)
        parts.append(
            f'<text x="{PAD - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">'
            f"{value:.4g}</text>"
        )
    for step in _ticks(x0, x1):
        x, _ = xy(step, y0)
        parts.append(
            f'<text x="{x:.1f}" y="{HEIGHT - PAD + 14}" text-anchor="middle" font-size="10">'
            f"{step:.0f}</text>"
        )
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        finite = [xy(*p) for p in values if math.isfinite(p[1])]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in finite)
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>'
        )
        parts.append(
            f'<text x="{PAD + 8 + 150 * i}" y="{HEIGHT - 8}" fill="{colour}" font-size="12">'
            f"{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _grouped(rows: list[dict]) -> list[tuple[str, dict[str, list[tuple[int, float]]]]]:
    names = sorted({k for row in rows for k in row if k != "step"})
    groups: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name in names:
        title = next(t for t, takes in GROUPS if takes(name))
        groups.setdefault(title, {})[name] = [(r["step"], r[name]) for r in rows if name in r]
    return [(title, groups[title]) for title, _ in GROUPS if title in groups]


def _sample_grids(workdir: str) -> str:
    index = os.path.join(workdir, previews.SAMPLES_DIR, previews.INDEX_FILE)
    if not os.path.exists(index):
        return "<p>No samples: the run had <code>sample.every = 0</code>.</p>"
    seen = {}
    with open(index) as f:
        for line in f:
            row = json.loads(line)
            seen[row["step"]] = row  # A resumed run draws some steps again: keep the last.
    parts = []
    for step, row in sorted(seen.items()):
        path = os.path.join(workdir, previews.SAMPLES_DIR, row["file"])
        if not os.path.exists(path):
            continue
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode()
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="samples of step {step}">'
            f"<figcaption>step {step} ({row['seconds']:.1f} s)</figcaption></figure>"
        )
    return "\n".join(parts)


def write_report(workdir: str) -> str:
    """Writes `workdir/report.html`; returns its path.

    Raises:
      errors.NotFound: `workdir` has no `metrics.jsonl` (not a training run's folder).
    """
    path = os.path.join(workdir, metrics.METRICS_FILE)
    if not os.path.exists(path):
        raise errors.NotFound(f"{path} does not exist: is --workdir a training run's folder?")
    rows = metrics.read_metrics(workdir)
    config_path = os.path.join(workdir, "config.json")
    config_text = "(no config.json)"
    if os.path.exists(config_path):
        with open(config_path) as f:
            config_text = f.read()
    charts = "\n".join(svg_chart(title, series) for title, series in _grouped(rows))
    last = rows[-1] if rows else {}
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.6g}</td></tr>" for k, v in last.items())
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>nsync-jax run {html.escape(workdir)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} svg{{margin:0.5em}}
figure{{display:inline-block;margin:0.5em}} img{{max-width:640px}}
pre{{background:#f4f4f4;padding:1em;overflow:auto}} td{{padding:0 1em}}</style></head>
<body>
<h1>Run {html.escape(workdir)}</h1>
<p>{len(rows)} logged intervals, steps {rows[0]["step"] if rows else 0} to
{last.get("step", 0)}.</p>
<h2>Metrics</h2>
{charts}
<h2>Last logged values</h2>
<table>{table}</table>
<h2>Samples over steps</h2>
{_sample_grids(workdir)}
<h2>Config</h2>
<pre>{html.escape(config_text)}</pre>
</body></html>
"""
    out = os.path.join(workdir, REPORT_FILE)
    with open(out, "w") as f:
        f.write(page)
    return out
