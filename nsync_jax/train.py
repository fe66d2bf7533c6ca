"""The training loop: set up, then step, log and stop on non-finite values.

Order of set-up (and, once checkpoints land, of resume): config check → mesh → model and
parameters → scope split → optimizer → state built under `jax.jit(out_shardings=...)` →
batches → the step compiled once with explicit shardings and the state donated.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import operator
import os
import time
from typing import Any

import jax
import ml_collections
import tqdm

from nsync_jax import metrics as metrics_lib
from nsync_jax import models, optim, projection, sharding
from nsync_jax import scope as scope_lib
from nsync_jax import step as step_lib
from nsync_jax.data import pipeline, sources


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Rejects unknown names and impossible sizes before anything is built."""
    checks = [
        (config.train.mode in optim.MODES, f"train.mode={config.train.mode!r}", optim.MODES),
        (
            config.train.scope in scope_lib.SCOPES,
            f"train.scope={config.train.scope!r}",
            scope_lib.SCOPES,
        ),
        (config.nsync.rule in projection.RULES, f"nsync.rule={config.nsync.rule!r}", projection.RULES),
        (
            config.nsync.granularity in projection.GRANULARITIES,
            f"nsync.granularity={config.nsync.granularity!r}",
            projection.GRANULARITIES,
        ),
        (config.model.source in ("tiny", "pretrained"), f"model.source={config.model.source!r}", ("tiny", "pretrained")),
        (
            config.data.source in sources.DATA_SOURCES,
            f"data.source={config.data.source!r}",
            sources.DATA_SOURCES,
        ),
    ]
    if config.train.mode == "nsync":
        checks.append(
            (
                config.negatives.source in sources.NEGATIVE_SOURCES,
                f"negatives.source={config.negatives.source!r}",
                sources.NEGATIVE_SOURCES,
            )
        )
    checks.append(
        (
            config.data.on_bad_image in pipeline.ON_BAD_IMAGE,
            f"data.on_bad_image={config.data.on_bad_image!r}",
            pipeline.ON_BAD_IMAGE,
        )
    )
    for ok, what, allowed in checks:
        if not ok:
            raise ValueError(f"{what} is not one of {tuple(allowed)}")
    for name in ("num_steps", "batch_size"):
        if config.train[name] < 1:
            raise ValueError(f"train.{name} must be >= 1, got {config.train[name]}")
    if config.log.every < 1:
        raise ValueError(f"log.every must be >= 1, got {config.log.every}")
    if "{caption}" not in config.train.prompt_template:
        raise ValueError(
            f"train.prompt_template {config.train.prompt_template!r} has no {{caption}}"
        )


@dataclasses.dataclass
class Trainer:
    """Everything set up for a run; `train()` builds one and runs it."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    model: models.StableDiffusion
    scope: scope_lib.Scope
    state: step_lib.TrainState
    state_sharding: Any
    batches: pipeline.PairedBatches
    step_fn: Any
    step_rng: jax.Array


def setup(config: ml_collections.ConfigDict) -> Trainer:
    """Builds mesh, model, scope, optimizer, sharded state, batches and the compiled step."""
    validate_config(config)
    mesh = sharding.make_mesh(config.mesh)
    if config.train.batch_size % sharding.batch_divisor(mesh):
        raise ValueError(
            f"train.batch_size={config.train.batch_size} does not divide over the "
            f"{sharding.batch_divisor(mesh)} devices of mesh {dict(mesh.shape)}"
        )
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    model, params = models.build(config.model, init_rng)
    scope, model, params = scope_lib.make_scope(config.train, model, params)
    trainable, frozen = scope.split(params)
    tx = optim.make_optimizer(config)

    def init(trainable, frozen):
        return step_lib.init_state(trainable, frozen, tx)

    state_shapes = jax.eval_shape(init, trainable, frozen)
    state_sharding = sharding.tree_shardings(mesh, state_shapes)
    state = jax.jit(init, out_shardings=state_sharding)(trainable, frozen)
    del params, trainable, frozen

    positives = sources.load_positives(config.data, config.model.resolution)
    negatives = None
    if config.train.mode == "nsync":
        negatives = sources.load_negatives(config.negatives, config.data, config.model.resolution)
    batches = pipeline.PairedBatches(
        positives,
        negatives,
        tokenize=model.tokenize,
        prompt_template=config.train.prompt_template,
        style_token=config.train.style_token,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        random_flip=config.data.random_flip,
        on_bad_image=config.data.on_bad_image,
    )
    if config.data.cache_latents:
        # The VAE is frozen in every scope, so its posterior moments never change.
        if "vae" not in state.frozen:
            raise ValueError(f"data.cache_latents needs a frozen VAE; scope {scope.name} trains it")
        vae_params = state.frozen["vae"]
        moments = jax.jit(functools.partial(step_lib.posterior_moments, model))
        batches.cache_latents(
            lambda px: moments(vae_params, px),
            config.data.latent_batch_size,
            config.model.resolution,
        )
    step = step_lib.make_train_step(
        model, scope, tx, config.train, trainable_shardings=state_sharding.trainable
    )
    replicated = sharding.replicated(mesh)
    step_fn = jax.jit(
        step,
        in_shardings=(state_sharding, sharding.batch_sharding(mesh), replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )
    return Trainer(config, mesh, model, scope, state, state_sharding, batches, step_fn, step_rng)


def _check_finite(state: step_lib.TrainState) -> None:
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
        raise FloatingPointError(
            f"non-finite loss or gradient at step {bad}; stopping (lower optim.learning_rate, "
            "set optim.clip_norm, or check the data)"
        )


def train(config: ml_collections.ConfigDict, workdir: str) -> step_lib.TrainState:
    """Runs `config` in `workdir`; returns the final state. Metrics go to the workdir."""
    os.makedirs(workdir, exist_ok=True)
    trainer = setup(config)
    writer = metrics_lib.MetricWriter(workdir)
    is_main = jax.process_index() == 0
    logging.info(
        "training %s (%s scope) for %d steps on mesh %s; %d style images",
        config.train.mode,
        config.train.scope,
        config.train.num_steps,
        dict(trainer.mesh.shape),
        len(trainer.batches),
    )
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    images_per_step = config.train.batch_size * (2 if config.train.mode == "nsync" else 1)
    state = trainer.state
    start = int(jax.device_get(state.step))
    sums, count = None, 0
    tick, tick_step = time.perf_counter(), start
    bar = tqdm.trange(start, config.train.num_steps, disable=not is_main, desc="train")
    try:
        for step in bar:
            batch = sharding.global_batch(trainer.mesh, trainer.batches.batch(step))
            state, metrics = trainer.step_fn(state, batch, trainer.step_rng)
            sums = metrics if sums is None else jax.tree.map(operator.add, sums, metrics)
            count += 1
            done = step + 1
            if done % config.log.every == 0 or done == config.train.num_steps:
                _check_finite(state)
                means = {k: float(v) / count for k, v in jax.device_get(sums).items()}
                now = time.perf_counter()
                steps_per_s = (done - tick_step) / (now - tick)
                means.update(steps_per_s=steps_per_s, images_per_s=steps_per_s * images_per_step)
                writer.write(done, means)
                bar.set_postfix({k: f"{means[k]:.4g}" for k in ("loss_pos", "steps_per_s")})
                sums, count = None, 0
                tick, tick_step = now, done
    finally:
        bar.close()
        writer.close()
    return state
