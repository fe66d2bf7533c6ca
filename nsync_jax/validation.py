"""Validation loss: held-out style images scored at fixed noise and fixed timesteps.

`data.val_count` style images are held out of training (`split_validation`: a choice
fixed by `config.seed`, so every run of a config holds out the same ones; their negatives
are never used). Every `log.val_every` steps the current weights score them with the
positive branch's diffusion loss (the training loss, same prompt template) under one key
that never changes: the same posterior samples, noise and timesteps at every step and in
every run of the seed, so the curve moves only with the weights and is comparable
across steps and runs. Logged as `val_loss` in the same row as the training metrics.

The held-out images are served in batches of `train.batch_size` (the training batch
shape, sharded as training's); the last batch is filled from the start of the set, so
when `data.val_count` is not a multiple of the batch size a few images count twice (the
same ones at every step).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nsync_jax import diffusion, errors, loop, sharding
from nsync_jax import step as step_lib
from nsync_jax.data.examples import ExampleSet

# Folded into the run's seed for the validation key: unrelated to every training draw.
_VALIDATION_STREAM = 0x7A11D


def split_validation(positives: ExampleSet, count: int, seed: int) -> tuple[ExampleSet, ExampleSet]:
    """(training, held-out) examples: `count` of them held out, chosen by `seed`."""
    if not 0 <= count < len(positives):
        raise errors.ConfigError(
            f"data.val_count={count} must be >= 0 and leave training images: the style set "
            f"has {len(positives)}"
        )
    order = np.random.default_rng([seed, _VALIDATION_STREAM]).permutation(len(positives))
    held = set(order[:count].tolist())
    ids = positives.ids
    return (
        positives.select([i for r, i in enumerate(ids) if r not in held]),
        positives.select([i for r, i in enumerate(ids) if r in held]),
    )


class Validation(loop.Hook):
    """Scores the held-out images when due and hands `val_loss` to `log` (its next row).

    Args:
      batches: the held-out images as a `PairedBatches` (positive branch only).
      mesh: the training mesh.
      model, scope, schedule: as training builds them.
      seed: the run's seed (the fixed key derives from it).
      every: steps between scorings.
      log: the `loop.LogMetrics` whose row at the same step takes `val_loss`.
    """

    def __init__(self, batches, mesh, model, scope, seed: int, every: int, log):
        self.every, self.log, self.mesh = every, log, mesh
        self.count = math.ceil(len(batches) / batches.global_batch_size)
        self.batches = [batches.batch(i) for i in range(self.count)]
        schedule = diffusion.make_schedule(model.scheduler_config)
        loss = step_lib.make_branch_loss(model, scope, schedule)
        key = jax.random.fold_in(jax.random.key(seed), _VALIDATION_STREAM)
        # Per batch: (posterior key, noise key), the same at every scoring.
        self.keys = [tuple(jax.random.split(jax.random.fold_in(key, i))) for i in range(self.count)]
        self._loss = jax.jit(loss)

    def __call__(self, step: int, state: Any) -> None:
        total = jnp.zeros((), jnp.float32)
        for batch, key in zip(self.batches, self.keys, strict=True):
            branch = sharding.global_batch(self.mesh, batch["positive"])
            total = total + self._loss(state.trainable, state.frozen, branch, *key)
        self.log.extra["val_loss"] = total / self.count


def validate_config(config: ml_collections.ConfigDict) -> None:
    """`data.val_count` and `log.val_every` make sense together (called by train.py)."""
    if config.data.val_count < 0 or config.log.val_every < 0:
        raise errors.ConfigError(
            f"data.val_count={config.data.val_count} and log.val_every={config.log.val_every} "
            "must be >= 0"
        )
    if bool(config.data.val_count) != bool(config.log.val_every):
        raise errors.ConfigError(
            "set data.val_count and log.val_every together (both 0: no validation); got "
            f"data.val_count={config.data.val_count}, log.val_every={config.log.val_every}"
        )
    if config.log.val_every and config.log.val_every % config.log.every:
        raise errors.ConfigError(
            f"log.val_every={config.log.val_every} must be a multiple of log.every="
            f"{config.log.every}: val_loss is written in the metrics row of its step"
        )
