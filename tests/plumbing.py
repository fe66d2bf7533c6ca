"""The demo config with the smallest model that still has every part, for tests of
plumbing (checkpoints and resumes, data paths, scopes, hooks), not of numerics.

One UNet level (no down- or up-sampling; the text enters through the middle block's
cross-attention), a one-block VAE, one CLIP text layer and 16 tokens: every compile of its
training step costs a fraction of the demo model's, and compiling is what the default
suite spends its time on. Tests of what the model computes keep the demo config
(`configs/demo.py`) or real shapes.

Tests import this module as `import plumbing` (pytest puts `tests/` on `sys.path`);
`conftest.py`'s `plumbing_sd` fixture is `base()`.
"""

from __future__ import annotations

import functools
from typing import Any

import ml_collections

from configs import demo

# The overrides of configs/demo.py, as `--config.<name>=<value>` flags take them too.
MODEL = {
    "model.tiny.unet_channels": (32,),
    "model.tiny.vae_channels": (32,),
    "model.tiny.text_layers": 1,
    "model.tiny.max_length": 16,
}


def config() -> ml_collections.ConfigDict:
    """A fresh copy: `configs/demo.py` with the one-level model."""
    config = demo.get_config()
    for key, value in MODEL.items():
        group, name = key.rsplit(".", 1)
        config[group][name] = value
    return config


@functools.cache
def base() -> tuple[Any, Any]:
    """`config()`'s model and params as training builds them, once per process: pass as
    `base=` to `train.setup` or `train.train` with a config of the same `model` group and
    seed. Read-only: jax arrays are immutable, and scopes return copies of what they change.
    """
    from nsync_jax import runs

    return runs.build_base(config())
