"""Metric writer: `metrics.jsonl` (any reader) and TensorBoard event files, process 0 only."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np


class MetricWriter:
    """Appends scalar metrics to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/`.

    Only process 0 writes; elsewhere every call is a no-op, so callers need no guard.
    """

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._tb.add_scalar(name, value, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            self.enabled = False


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """The rows of `<workdir>/metrics.jsonl`, oldest first."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
