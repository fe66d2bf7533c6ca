"""Metric writer: `metrics.jsonl` (any reader) and TensorBoard event files, process 0 only."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrites `path` without its rows of steps after `step` (atomically).

    A partial last line (the run was killed mid-write) is dropped too.
    """
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and row["step"] <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class MetricWriter:
    """Appends scalar metrics to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/`.

    Only process 0 writes; elsewhere every call is a no-op, so callers need no guard.

    Args:
      workdir: the run's directory.
      enabled: whether this process writes; default: process 0 only.
      start_step: the step a training run starts (or resumes) from. Rows of later steps,
        left by a run that went past its last checkpoint before it stopped, are dropped
        from `metrics.jsonl` and hidden in TensorBoard (its `purge_step`), so the replayed
        steps are not logged twice. None (e.g. evaluation adding scalars) keeps all rows.
    """

    def __init__(self, workdir: str, enabled: bool | None = None, start_step: int | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, METRICS_FILE)
            if start_step is not None:
                _drop_rows_after(path, start_step)
            self._jsonl = open(path, "a")  # noqa: SIM115
            from tensorboardX import SummaryWriter

            purge = None if start_step is None else start_step + 1
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._tb.add_scalar(name, value, int(step))
        self._tb.flush()

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """An HWC uint8 image to TensorBoard (not to `metrics.jsonl`)."""
        if self.enabled:
            self._tb.add_image(name, image, int(step), dataformats="HWC")
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            self.enabled = False


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """The rows of `<workdir>/metrics.jsonl`, oldest first."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]
