"""The loop's pieces on their own: hooks, the stop signals. The loop running a real
trainer is tested through `train.train` (tests/test_checkpoint.py, tests/test_train.py)."""

import os
import signal
import time

import flax.struct
import jax
import jax.numpy as jnp
import pytest

from nsync_jax import loop


@flax.struct.dataclass
class _State:
    step: jax.Array


def test_preemption_watcher_turns_sigterm_into_a_flag():
    previous = signal.getsignal(signal.SIGTERM)
    with loop.PreemptionWatcher() as watcher:
        assert not watcher.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.should_stop(2)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_preemption_watcher_turns_the_first_ctrl_c_into_a_flag_and_the_second_into_an_interrupt():
    previous = signal.getsignal(signal.SIGINT)
    with loop.PreemptionWatcher() as watcher:
        os.kill(os.getpid(), signal.SIGINT)
        assert watcher.should_stop(3) and watcher.interrupted
        with pytest.raises(KeyboardInterrupt):  # The second Ctrl-C does not wait for a save.
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is previous


class _CountingTrainer:
    """A trainer whose step adds 1 to a counter: the loop without a model."""

    def __init__(self):
        self.batches_asked = []

    def step_fn(self, state, batch):
        return _State(state.step + 1), {"x": jnp.float32(batch)}

    def batch(self, step):
        self.batches_asked.append(step)
        return step


class _Recorder(loop.Hook):
    def __init__(self, every, on_stop=False):
        self.every, self.on_stop = every, on_stop
        self.calls, self.seen, self.closed = [], [], False

    def after_step(self, step, state, metrics):
        self.seen.append(float(metrics["x"]))

    def __call__(self, step, state):
        self.calls.append((step, int(state.step)))

    def close(self):
        self.closed = True


def test_run_steps_from_the_state_step_and_calls_hooks_when_due():
    trainer = _CountingTrainer()
    every3, at_end = _Recorder(every=3), _Recorder(every=0)
    state = loop.run(trainer, _State(jnp.int32(2)), 10, [every3, at_end])
    assert int(state.step) == 10
    assert trainer.batches_asked == list(range(2, 10))  # Batch s for step s, from the state.
    assert every3.calls == [(3, 3), (6, 6), (9, 9), (10, 10)]  # Every 3 and the last.
    assert at_end.calls == [(10, 10)]
    assert every3.seen == [float(s) for s in range(2, 10)]
    assert every3.closed and at_end.closed


class _StopAt:
    def __init__(self, step):
        self.step = step

    def should_stop(self, step):
        return step >= self.step


def test_a_stop_adds_only_the_on_stop_hooks_at_the_step_reached():
    saver, logger = _Recorder(every=4, on_stop=True), _Recorder(every=2)
    state = loop.run(_CountingTrainer(), _State(jnp.int32(0)), 10, [logger, saver], _StopAt(3))
    assert int(state.step) == 3
    assert saver.calls == [(3, 3)]
    assert logger.calls == [(2, 2)]  # Not called at the stop: no partial interval row.
    assert logger.closed and saver.closed
    # A hook due anyway at the stop step still runs there (a metrics row of step 4).
    logger = _Recorder(every=2)
    loop.run(_CountingTrainer(), _State(jnp.int32(0)), 10, [logger], _StopAt(4))
    assert logger.calls == [(2, 2), (4, 4)]


def test_hooks_are_closed_when_a_hook_raises():
    class Boom(loop.Hook):
        every = 2

        def __call__(self, step, state):
            raise FloatingPointError("bad")

    recorder = _Recorder(every=1)
    with pytest.raises(FloatingPointError):
        loop.run(_CountingTrainer(), _State(jnp.int32(0)), 5, [recorder, Boom()])
    assert recorder.closed and recorder.calls == [(1, 1), (2, 2)]
