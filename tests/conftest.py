"""Test set-up: eight fake CPU devices and a persistent compilation cache.

Both must be set before JAX creates its backends, so they happen at import of this file.
The cache lets tests that compile the same tiny model reuse each other's executables.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No test may reach a model hub: fail at once instead of retrying a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "NSYNC_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "nsync-jax-test-cache")
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Library modules install no log filters when imported; programs do (`cli.setup_logging`).
# Tests keep orbax's INFO lines out likewise.
from nsync_jax import checkpoint  # noqa: E402

checkpoint.quiet_orbax_logs()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd():
    """The demo config's tiny Stable Diffusion and its params as training builds them, once.

    Treat as read-only: jax arrays are immutable, and scopes return copies of what they change.
    """
    from configs import demo
    from nsync_jax import runs

    return runs.build_base(demo.get_config())


@pytest.fixture(scope="session")
def plumbing_sd():
    """`tests/plumbing.py`'s one-level model and its params as training builds them, once:
    `plumbing.base()`. Read-only, as `tiny_sd`."""
    import plumbing

    return plumbing.base()


def _save_run(workdir, config, trainable, frozen, ema=None):
    """Writes a step-0 checkpoint of a run with these parameters, as the loop would.

    Only the trainable params (and their EMA, if given: then `config.train.ema_decay`
    should be > 0) matter to readers of a run (export, sampling, evaluation): a
    one-counter optimizer state keeps the checkpoint cheap.
    """
    import jax.numpy as jnp
    import optax

    from nsync_jax import checkpoint
    from nsync_jax import step as step_lib

    counter = optax.GradientTransformation(lambda _: {"count": jnp.zeros((), jnp.int32)}, None)
    state = step_lib.init_state(trainable, frozen, counter, jax.random.key(0))
    if ema is not None:
        state = state.replace(ema=ema)
    with checkpoint.make_manager(workdir) as manager:
        checkpoint.save(manager, state, config, checkpoint.tree_summary(frozen), {})
        manager.wait_until_finished()


@pytest.fixture
def save_run():
    """`save_run(workdir, config, trainable, frozen, ema=None)`: a cheap checkpoint of a run."""
    return _save_run
