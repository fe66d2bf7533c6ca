"""A stage's training run: set up, restore, then `loop.run` with the trainer's hooks.

Each stage runs in `<workdir>/stage<k>` with the trainer's machinery: the (data, fsdp)
mesh and FSDP shardings, the state built under `jax.jit(out_shardings=...)`, the step
compiled once with the state donated, orbax checkpoints of `TrainState.saved()` with exact
resume (config, data and frozen-parameter checks), metrics, the progress bar, the
non-finite check, SIGTERM/Ctrl-C saves.

Order of set-up and resume: config check → the stage's latest checkpoint's config
compared with this one → mesh → images (before any model: a missing data set should not
wait for weights) → what the stage starts from (stage 2: stage 1's bank, checked to be of
the same images; stage 3: stage 2's encoder) → model and the placeholder token (stages 1,
3) → encoder (stages 2, 3) → optimizer → state under `jax.jit(out_shardings=...)` → the
step compiled with explicit shardings → if resuming: data and frozen-parameter
fingerprints checked, the saved state restored into the state's shardings → `loop.run`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections
import optax

from nsync_jax import checkpoint, errors, hosts, loop, optim, runs, sharding
from nsync_jax import metrics as metrics_lib
from nsync_jax import step as step_lib
from nsync_jax.data import sources
from nsync_jax.style_encoder import data as data_lib
from nsync_jax.style_encoder import encoder as encoder_lib
from nsync_jax.style_encoder import splice, stages

STAGES = (1, 2, 3)
BANK = "trainable.bank"  # The bank's name in a stage-1 checkpoint's checksums.


def stage_dir(workdir: str, stage: int) -> str:
    """Where stage `stage` of the run in `workdir` keeps its checkpoints and metrics."""
    return os.path.join(os.path.abspath(workdir), f"stage{stage}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Rejects unknown names and impossible sizes before anything is built."""
    if config.stage not in STAGES:
        raise errors.ConfigError(f"stage={config.stage!r} is not one of {STAGES}")
    encoder_lib.check_config(config.style)
    for name in ("{caption}", "{style}"):
        if name not in config.style.prompt_template:
            raise errors.ConfigError(
                f"style.prompt_template {config.style.prompt_template!r} has no {name}"
            )
    for k in STAGES:
        group = config[f"stage{k}"]
        if group.batch_size < 1:
            raise errors.ConfigError(f"stage{k}.batch_size must be >= 1, got {group.batch_size}")
        count = group.steps_per_batch if k == 1 else group.epochs
        if count < 1:
            what = "steps_per_batch" if k == 1 else "epochs"
            raise errors.ConfigError(f"stage{k}.{what} must be >= 1, got {count}")
        if group.optim.schedule not in optim.SCHEDULES:
            raise errors.ConfigError(
                f"stage{k}.optim.schedule={group.optim.schedule!r} is not one of {optim.SCHEDULES}"
            )
        if group.optim.name not in optim.OPTIMIZERS:
            raise errors.ConfigError(
                f"stage{k}.optim.name={group.optim.name!r} is not one of {optim.OPTIMIZERS}"
            )
    if config.log.every < 1:
        raise errors.ConfigError(f"log.every must be >= 1, got {config.log.every}")
    if config.checkpoint.every < 0 or config.checkpoint.keep < 1:
        raise errors.ConfigError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")


def _optimizer(group: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """The stage's optimizer (`optim.base_optimizer`), its schedule over `num_steps`."""
    parts = []
    if group.optim.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(group.optim.clip_norm))
    parts.append(optim.base_optimizer(group.optim, optim.learning_rate(group.optim, num_steps)))
    return optax.chain(*parts)


@dataclasses.dataclass
class StageRun:
    """Everything set up for one stage; `loop.run` steps it.

    `step_fn(state, batch) -> (state, metrics)` is compiled with explicit shardings and
    the state donated; `batch(step)` is step `step`'s global batch on the mesh.
    """

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    state: step_lib.TrainState
    state_sharding: Any
    step_fn: Any
    batches: data_lib.StyleBatches
    num_steps: int
    encoder: encoder_lib.StyleEncoder | None = None  # Stages 2 and 3.
    model: Any = None  # Stages 1 and 3: the frozen SD parts (`models.StableDiffusion`).
    placeholder_id: int | None = None  # Stages 1 and 3.

    def batch(self, step: int) -> Any:
        return sharding.global_batch(self.mesh, self.batches.batch(step))


def _mesh(config: ml_collections.ConfigDict, batch_size: int, devices) -> jax.sharding.Mesh:
    devices = list(jax.devices() if devices is None else devices)
    try:
        mesh = sharding.make_mesh(config.mesh, devices)
    except ValueError as e:
        raise errors.ConfigError(f"{e}; set mesh.data and mesh.fsdp to fit") from e
    if batch_size % sharding.batch_divisor(mesh):
        raise errors.ConfigError(
            f"stage{config.stage}.batch_size={batch_size} does not divide over the "
            f"{len(devices)} devices of mesh {dict(mesh.shape)}"
        )
    return mesh


def _sd_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """The frozen SD parts with the placeholder as one token, and its id."""
    model, params = runs.build_base(config, lambda tree: sharding.tree_shardings(mesh, tree))
    model, params, placeholder_id = splice.placeholder_token(
        model, params, config.style.placeholder
    )
    return model, runs.frozen_for_training(config, params), placeholder_id


def _on_mesh(mesh: jax.sharding.Mesh, abstract: Any) -> Any:
    """`abstract`'s shapes with the mesh's FSDP shardings (where a restore lands)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract,
        sharding.tree_shardings(mesh, abstract),
    )


def planned_steps(config: ml_collections.ConfigDict, stage: int, num_images: int) -> int:
    """The steps stage `stage` of `config` runs on `num_images` images."""
    group = config[f"stage{stage}"]
    passes = group.steps_per_batch if stage == 1 else group.epochs
    return passes * math.ceil(num_images / group.batch_size)


def _previous(workdir: str, stage: int) -> str:
    """The previous stage's folder; stops if it saved nothing, warns if it stopped early."""
    previous = stage_dir(workdir, stage - 1)
    step = checkpoint.latest_step(previous)
    if step is None:
        raise errors.NotFound(
            f"stage {stage} starts from stage {stage - 1}, but {previous} holds no checkpoint: "
            f"run --config.stage={stage - 1} with the same --workdir first"
        )
    meta = checkpoint.load_metadata(previous, step)
    planned = planned_steps(
        checkpoint.load_run_config(previous, step), stage - 1, meta["data"]["num_examples"]
    )
    if step < planned:
        logging.warning(
            "stage %d in %s stopped at step %d of %d: stage %d starts from there (rerun "
            "stage %d to finish it first)",
            stage - 1,
            previous,
            step,
            planned,
            stage,
            stage - 1,
        )
    return previous


def _stage1_bank(workdir: str, mesh, batches: data_lib.StyleBatches, num_tokens: int):
    """Stage 1's trained vectors, placed on the mesh, after checking they are of these
    images (the same ids in the same order) and of `num_tokens` tokens."""
    previous = _previous(workdir, 2)
    meta = checkpoint.load_metadata(previous)
    if meta["data"].get("ids_sha256") != batches.fingerprint()["ids_sha256"]:
        raise errors.ConfigError(
            f"stage 1 in {previous} inverted other images (ids differ): stage 2 regresses on "
            "the vectors of the same images; use stage 1's data settings"
        )
    shape = tuple(meta["checksums"][BANK]["shape"])
    if shape[:2] != (len(batches), num_tokens):
        raise errors.ConfigError(
            f"stage 1's bank in {previous} is {shape}; this run needs {len(batches)} images "
            f"x {num_tokens} tokens"
        )
    abstract = _on_mesh(mesh, {"bank": jax.ShapeDtypeStruct(shape, jax.numpy.float32)})
    bank, step = checkpoint.restore_trainable(previous, abstract)
    logging.info("stage 2 regresses on stage 1's vectors of step %d (%s)", step, previous)
    return bank


def setup(config: ml_collections.ConfigDict, workdir: str, devices=None) -> StageRun:
    """Builds mesh, data, models, optimizer, sharded state and the compiled step of
    `config.stage` (module doc); `workdir` holds the previous stages."""
    validate_config(config)
    stage = config.stage
    group = config[f"stage{stage}"]
    mesh = _mesh(config, group.batch_size, devices)
    examples = sources.load_positives(config.data, config.model.resolution)
    init_rng, step_rng = runs.run_keys(config.seed)
    bank_rng, encoder_rng = jax.random.split(jax.random.fold_in(init_rng, 1))

    def batches_for(tokenize, order, steps_per_batch=1):
        if len(examples) < group.batch_size:
            raise errors.ConfigError(
                f"stage{stage}.batch_size={group.batch_size} is more than the "
                f"{len(examples)} style images: a batch holds distinct images"
            )
        return data_lib.StyleBatches(
            examples,
            tokenize,
            config.style.prompt_template,
            config.style.placeholder,
            group.batch_size,
            config.seed,
            order,
            steps_per_batch,
        )

    encoder = model = placeholder_id = None
    if stage == 2:
        # No diffusion model: no prompts, and the bank has the text encoder's width.
        batches = batches_for(None, "epochs")
        frozen = _stage1_bank(workdir, mesh, batches, config.style.num_tokens)
        encoder, trainable = encoder_lib.build(config.style, frozen["bank"].shape[-1], encoder_rng)
        num_steps = planned_steps(config, 2, len(batches))
        tx = _optimizer(group, num_steps)
        step = stages.make_stage2_step(encoder, tx)
        init = step_lib.init_state
    else:
        model, frozen, placeholder_id = _sd_model(config, mesh)
        width = model.text_encoder.config.hidden_size
        if stage == 1:
            batches = batches_for(model.tokenize, "chunks", group.steps_per_batch)
            trainable = stages.init_bank(
                bank_rng, len(batches), config.style.num_tokens, width, config.style.init_std
            )
            num_steps = planned_steps(config, 1, len(batches))
            # Each row's own AdamW counts only its own steps: the schedule spans those.
            tx = _optimizer(group, group.steps_per_batch)
            step = stages.make_stage1_step(model, tx, placeholder_id)
            init = stages.init_stage1_state
        else:
            batches = batches_for(model.tokenize, "epochs")
            previous = _previous(workdir, 3)
            encoder, initial = encoder_lib.build(config.style, width, encoder_rng)
            trainable, from_step = checkpoint.restore_trainable(
                previous, _on_mesh(mesh, checkpoint.abstract_like(initial))
            )
            logging.info("stage 3 starts from stage 2's encoder of step %d", from_step)
            num_steps = planned_steps(config, 3, len(batches))
            tx = _optimizer(group, num_steps)
            step = stages.make_stage3_step(model, encoder, tx, placeholder_id)
            init = step_lib.init_state

    def init_state(trainable, frozen):
        return init(trainable, frozen, tx, step_rng)

    shapes = jax.eval_shape(init_state, trainable, frozen)
    state_sharding = sharding.tree_shardings(mesh, shapes)
    state = jax.jit(init_state, out_shardings=state_sharding)(trainable, frozen)
    step_fn = jax.jit(
        step,
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    return StageRun(
        config,
        mesh,
        state,
        state_sharding,
        step_fn,
        batches,
        num_steps,
        encoder,
        model,
        placeholder_id,
    )


def train_stage(
    config: ml_collections.ConfigDict, workdir: str, devices=None
) -> step_lib.TrainState:
    """Trains `config.stage` in `<workdir>/stage<k>`, resuming from its newest checkpoint.

    Saves every `checkpoint.every` steps, at the end, and on SIGTERM or Ctrl-C (then
    stops; rerun the same command to resume). Returns the final state.
    """
    hosts.check_same_config(config)
    validate_config(config)
    hosts.check_shared_dir(workdir, "--workdir")
    where = stage_dir(workdir, config.stage)
    resume_step = checkpoint.latest_step(where)
    meta = None
    if resume_step is not None:  # A changed config stops here, before anything is built.
        meta = checkpoint.check_resumable(where, resume_step, config)
    run = setup(config, workdir, devices)
    os.makedirs(where, exist_ok=True)
    manager = checkpoint.make_manager(where, keep=config.checkpoint.keep)
    try:
        return _run(config, where, run, manager, resume_step, meta)
    finally:
        manager.wait_until_finished()
        manager.close()


def _run(config, where, run: StageRun, manager, resume_step, meta) -> step_lib.TrainState:
    frozen_summary = checkpoint.tree_summary(run.state.frozen)
    data = run.batches.fingerprint()
    state = run.state
    if resume_step is not None:
        logging.info("resuming stage %d from step %d", config.stage, resume_step)
        state = checkpoint.restore_state(
            manager, where, resume_step, meta, state, frozen_summary, data
        )
    start = int(jax.device_get(state.step))
    logging.info(
        "style encoder stage %d: %d steps on mesh %s; %d images",
        config.stage,
        run.num_steps,
        dict(run.mesh.shape),
        len(run.batches),
    )

    def save(step: int, state: step_lib.TrainState) -> None:
        loop.check_finite(state)
        checkpoint.save(manager, state, config, frozen_summary, data)

    bar = loop.ProgressBar(start, run.num_steps, desc=f"stage {config.stage}")
    writer = metrics_lib.MetricWriter(where, start_step=start)
    batch_size = config[f"stage{config.stage}"].batch_size
    log = loop.LogMetrics(
        writer, config.log.every, batch_size, start, bar=bar, num_steps=run.num_steps
    )
    hooks = [
        bar,
        log,
        loop.CheckFinite(config.log.every),
        loop.Callback(save, config.checkpoint.every, on_stop=True),
    ]
    watcher = loop.PreemptionWatcher()
    hosts.sync("the first step")  # After per-process work (restore checks, compiles).
    tick = time.perf_counter()
    with watcher:
        state = loop.run(run, state, run.num_steps, hooks, watcher)
    end = int(jax.device_get(state.step))
    logging.info(
        "stage %d: steps %d -> %d of %d in %.1fs%s; checkpoint %s",
        config.stage,
        start,
        end,
        run.num_steps,
        time.perf_counter() - tick,
        f", stopped by {watcher.received}: rerun to resume" if watcher.received else "",
        checkpoint.step_dir(where, end),
    )
    if watcher.interrupted:
        manager.wait_until_finished()
        raise KeyboardInterrupt
    return state
