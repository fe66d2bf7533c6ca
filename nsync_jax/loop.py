"""The one training loop: step, then run the hooks that are due; stop on a signal.

`run(trainer, state, num_steps, hooks, watcher)` steps `trainer.step_fn` from `state.step`
to `num_steps` on the global batch of each step (`trainer.batch(step)`). Everything else
a run does at intervals is a `Hook`: writing metrics, the non-finite check, checkpoints,
the progress bar, and what later features add (samples, validation; the EMA, updated at
every step, lives in the step). `train.py`, the tests and every benchmark call this loop.

A hook sees every step's metrics (`after_step`, which must not wait for the device) and
runs (`__call__`) when due: every `every` steps, at the last step, and, if `on_stop`, also
at the step where a stop signal was taken. Hooks run in list order, so the non-finite check
goes before the checkpoint.
"""

from __future__ import annotations

import logging
import operator
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import orbax.checkpoint as ocp
import tqdm

Metrics = dict[str, jax.Array]


class Trainer(Protocol):
    """What the loop needs of a set-up run (`train.Trainer` is one)."""

    step_fn: Any  # (state, batch) -> (state, metrics), compiled.

    def batch(self, step: int) -> Any:
        """The global (sharded) batch of `step`."""


class FixedBatch:
    """A trainer that serves one batch at every step: benchmarks time the compiled step
    alone, without the host's batch assembly."""

    def __init__(self, step_fn: Any, batch: Any):
        self.step_fn, self._batch = step_fn, batch

    def batch(self, step: int) -> Any:
        return self._batch


class Hook:
    """Something the loop does at intervals.

    Attributes:
      every: steps between calls; 0 calls only at the last step (and on stop).
      on_stop: whether to call it at the step where the run stops early on a signal.
    """

    every: int = 0
    on_stop: bool = False

    def after_step(self, step: int, state: Any, metrics: Metrics) -> None:
        """Called after every step with its (not yet fetched) metrics; must not block."""

    def __call__(self, step: int, state: Any) -> None:
        """Called when due, with the number of steps done and the state after them."""

    def close(self) -> None:
        """Called once when the loop ends, however it ends."""

    def due(self, step: int, last: bool, stopping: bool) -> bool:
        regular = last or bool(self.every and step % self.every == 0)
        return regular or (stopping and self.on_stop)


def run(
    trainer: Trainer,
    state: Any,
    num_steps: int,
    hooks: Sequence[Hook] = (),
    watcher: PreemptionWatcher | None = None,
) -> Any:
    """Steps `state` to `num_steps`, running the hooks that are due after each step.

    Args:
      trainer: holds the compiled step and the batches.
      state: the state to start from (donated to the first step: use the returned one).
      num_steps: the step to stop at.
      hooks: run in this order when due.
      watcher: if given (and installed), a stop signal ends the loop after the step in
        flight, with the `on_stop` hooks run at that step.

    Returns:
      The state reached: after `num_steps` steps, or at the stop.
    """
    start = int(jax.device_get(state.step))
    try:
        for step in range(start, num_steps):
            state, metrics = trainer.step_fn(state, trainer.batch(step))
            done = step + 1
            for hook in hooks:
                hook.after_step(done, state, metrics)
            stopping = watcher is not None and watcher.should_stop(done)
            last = done == num_steps
            for hook in hooks:
                if hook.due(done, last, stopping):
                    hook(done, state)
            if stopping:
                break
    finally:
        for hook in hooks:
            hook.close()
    return state


# --- Hooks ---------------------------------------------------------------------------------


def check_finite(state: Any) -> None:
    """Raises `FloatingPointError` naming the first step whose loss or gradient was not
    finite (`state.nonfinite_step`); a device sync, so the loop does it at intervals."""
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
        raise FloatingPointError(
            f"non-finite loss or gradient at step {bad}; stopping (lower optim.learning_rate, "
            "set optim.clip_norm, or check the data)"
        )


class CheckFinite(Hook):
    """Stops the run at the first interval after a non-finite loss or gradient."""

    on_stop = True  # Never save a state past a non-finite value.

    def __init__(self, every: int):
        self.every = every

    def __call__(self, step: int, state: Any) -> None:
        check_finite(state)


class LogMetrics(Hook):
    """Means of every metric over each interval, with steps/s and images/s, to a writer
    (`metrics.MetricWriter`) and to the progress bar's postfix or, where the bar is off
    (output not a terminal), to one log line per interval (process 0).

    Attributes:
      last: the latest interval's means.
      best: for each `loss*` metric, its lowest interval mean and that interval's step.
      extra: values other hooks computed for this step's row (e.g. `val_loss`); written
        with the next row, then cleared. Hooks that set it run before this one.
    """

    def __init__(
        self,
        writer: Any,
        every: int,
        images_per_step: int,
        start: int,
        bar: ProgressBar | None = None,
        num_steps: int = 0,
    ):
        self.every = every
        self.writer, self.images_per_step, self.bar = writer, images_per_step, bar
        self.num_steps = num_steps
        self.sums, self.count = None, 0
        self.tick, self.tick_step = time.perf_counter(), start
        self.last: dict[str, float] = {}
        self.best: dict[str, tuple[float, int]] = {}
        self.extra: dict[str, Any] = {}

    def after_step(self, step: int, state: Any, metrics: Metrics) -> None:
        self.sums = metrics if self.sums is None else jax.tree.map(operator.add, self.sums, metrics)
        self.count += 1

    def __call__(self, step: int, state: Any) -> None:
        if not self.count:
            return
        means = {k: float(v) / self.count for k, v in jax.device_get(self.sums).items()}
        now = time.perf_counter()
        steps_per_s = (step - self.tick_step) / (now - self.tick)
        means.update(steps_per_s=steps_per_s, images_per_s=steps_per_s * self.images_per_step)
        means.update({k: float(v) for k, v in jax.device_get(self.extra).items()})
        self.extra = {}
        self.writer.write(step, means)
        names = ("loss", "loss_pos", "loss_neg", "val_loss", "steps_per_s")
        shown = {k: f"{means[k]:.4g}" for k in names if k in means}
        if self.bar is not None and self.bar.interactive:
            self.bar.bar.set_postfix(shown)
        elif jax.process_index() == 0:
            of = f"/{self.num_steps}" if self.num_steps else ""
            logging.info(
                "%s: step %d%s, %s",
                self.bar.desc if self.bar is not None else "train",
                step,
                of,
                ", ".join(f"{k} {v}" for k, v in shown.items()),
            )
        for name, value in means.items():
            lower = name not in self.best or value < self.best[name][0]
            if (name.startswith("loss") or name == "val_loss") and lower:
                self.best[name] = (value, step)
        self.last = means
        self.sums, self.count = None, 0
        self.tick, self.tick_step = now, step

    def close(self) -> None:
        self.writer.close()


class ProgressBar(Hook):
    """A tqdm bar over the run's steps, on process 0 only, and only when its output
    (stderr) is a terminal: in a log file (CI, `nohup`, a cluster's job log) a redrawn
    bar is noise, and `LogMetrics` writes one line per interval instead.

    Attributes:
      interactive: whether the bar is shown.
    """

    def __init__(self, start: int, num_steps: int, desc: str = "train", interactive=None):
        if interactive is None:
            interactive = sys.stderr.isatty()
        self.desc = desc
        self.interactive = interactive and jax.process_index() == 0
        self.bar = tqdm.tqdm(
            total=num_steps, initial=start, desc=desc, disable=not self.interactive
        )

    def after_step(self, step: int, state: Any, metrics: Metrics) -> None:
        self.bar.update(1)

    def due(self, step: int, last: bool, stopping: bool) -> bool:
        return False

    def close(self) -> None:
        self.bar.close()


class Callback(Hook):
    """A plain function `fn(step, state)` run every `every` steps (and at the last)."""

    def __init__(self, fn, every: int, on_stop: bool = False):
        self.fn, self.every, self.on_stop = fn, every, on_stop

    def __call__(self, step: int, state: Any) -> None:
        self.fn(step, state)


class AtSteps(Hook):
    """A function `fn(step, state)` run at the listed steps (and no others)."""

    def __init__(self, fn, steps):
        self.fn, self.steps = fn, set(steps)

    def due(self, step: int, last: bool, stopping: bool) -> bool:
        return step in self.steps

    def __call__(self, step: int, state: Any) -> None:
        self.fn(step, state)


class StepTimer(Hook):
    """Waits for every step and records its wall time (for benchmarks: the sync per step
    costs the overlap of host and device work a training run has).

    Attributes:
      seconds: wall time of each step, the first (which compiles) included.
      metrics: the last step's metrics, fetched.
    """

    def __init__(self):
        self.seconds: list[float] = []
        self.metrics: dict[str, float] = {}
        self._tick = time.perf_counter()

    def after_step(self, step: int, state: Any, metrics: Metrics) -> None:
        jax.block_until_ready((state, metrics))
        now = time.perf_counter()
        self.seconds.append(now - self._tick)
        self._tick = now
        self.metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}

    def due(self, step: int, last: bool, stopping: bool) -> bool:
        return False

    def restart(self) -> None:
        """Starts the next step's clock now (after work between `run` calls)."""
        self._tick = time.perf_counter()


# --- Stop signals --------------------------------------------------------------------------


class PreemptionWatcher:
    """Turns SIGTERM (the preemption signal) and Ctrl-C (SIGINT) into a flag the loop checks
    once per step; the loop then saves the step it reached and stops.

    The handler only sets the flag: saving from inside a signal handler could interleave
    with a step or a save in progress. A second Ctrl-C gets Python's default behaviour back
    (KeyboardInterrupt at once, no save) for a user who does not want to wait for the save.
    On one process the flag is the decision. With many processes each host's flag could flip
    at a different step, so the decision comes from JAX's preemption sync manager instead
    (`ocp.multihost.reached_preemption`: the coordination service agrees on one step for
    every host; it needs `jax.distributed.initialize()`, catches SIGTERM itself in C++, and
    works on CPU too). No Python SIGTERM handler is installed then (it would replace
    JAX's); a Ctrl-C is passed on to it as a SIGTERM to this process, so it also stops every
    host at one step (this host then ends as interrupted, the others as preempted).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None  # The first signal's name ("SIGTERM", "SIGINT").
        self._previous: dict[int, Any] = {}
        self._multihost = jax.process_count() > 1

    @property
    def interrupted(self) -> bool:
        """Whether the stop came from Ctrl-C (the caller then ends like a KeyboardInterrupt)."""
        return self.received == "SIGINT"

    def install(self) -> None:
        """Installs the handlers (main thread only; many processes: Ctrl-C only)."""
        if threading.current_thread() is not threading.main_thread():
            # Python only lets the main thread install handlers; SIGTERM then just kills.
            logging.warning("not on the main thread: SIGTERM will not save a checkpoint")
            return
        for signum in (signal.SIGINT,) if self._multihost else self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        """Puts back the handlers that were there before `install`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def __enter__(self) -> PreemptionWatcher:
        self.install()
        return self

    def __exit__(self, *exc_info) -> None:
        self.uninstall()

    def _handle(self, signum, frame) -> None:
        del frame
        if self.received is None:
            self.received = signal.Signals(signum).name
        if self._multihost:
            os.kill(os.getpid(), signal.SIGTERM)  # To JAX's preemption notifier.
        if signum == signal.SIGINT:
            # The next Ctrl-C interrupts at once (Python's default handler).
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def should_stop(self, step: int) -> bool:
        """True once a stop is signalled; the same `step` on every host."""
        if self._multihost:
            if not ocp.multihost.reached_preemption(step):
                return False
            self.received = self.received or "SIGTERM"
            logging.warning("preemption on some host: every host saves step %d", step)
            return True
        if self.received:
            how = "Ctrl-C again stops without saving" if self.interrupted else "then exiting"
            logging.warning("%s received: saving step %d (%s)", self.received, step, how)
        return self.received is not None
