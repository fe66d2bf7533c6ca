"""A training run: set up, restore, then `loop.run` with logging, checks and checkpoints.

Order of set-up and resume: (many processes: every process runs the same config) →
config check → (many processes: the workdir is one folder all share) → the latest
checkpoint's saved config compared with this one (cheap, before anything is built) → mesh
→ style data and negatives (opened before the model: a missing data set should not wait
for gigabytes of weights) → model and parameters → scope split → optimizer → state built
under `jax.jit(out_shardings=...)` → batches → the step compiled once with explicit
shardings and the state donated (many processes: compiled here, then all meet; with
aspect-ratio buckets: compiled once per bucket when its first batch comes) → if
resuming: data and frozen-parameter fingerprints checked, then the saved state (step, RNG,
trainable parameters, optimizer state, carried g−, EMA) restored straight into the
state's shardings (checkpoint.py) → (many processes: all meet) → `loop.run`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shlex
import time
from typing import Any

import jax
import ml_collections

from nsync_jax import (
    checkpoint,
    diffusion,
    errors,
    hosts,
    loop,
    models,
    optim,
    previews,
    projection,
    runs,
    sampling,
    sharding,
    style_contrast,
    unet_memory,
    validation,
)
from nsync_jax import metrics as metrics_lib
from nsync_jax import scope as scope_lib
from nsync_jax import step as step_lib
from nsync_jax.data import buckets as buckets_lib
from nsync_jax.data import pipeline, sources, styles


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Rejects unknown names and impossible sizes before anything is built."""
    checks = [
        (config.train.mode in optim.MODES, f"train.mode={config.train.mode!r}", optim.MODES),
        (
            config.train.scope in scope_lib.SCOPES,
            f"train.scope={config.train.scope!r}",
            scope_lib.SCOPES,
        ),
        (
            config.nsync.rule in projection.RULES,
            f"nsync.rule={config.nsync.rule!r}",
            projection.RULES,
        ),
        (
            config.nsync.granularity in projection.GRANULARITIES,
            f"nsync.granularity={config.nsync.granularity!r}",
            projection.GRANULARITIES,
        ),
        (
            config.model.source in runs.MODEL_SOURCES,
            f"model.source={config.model.source!r}",
            runs.MODEL_SOURCES,
        ),
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
            raise errors.ConfigError(f"{what} is not one of {tuple(allowed)}")
    for name in ("num_steps", "batch_size", "grad_accum"):
        if config.train[name] < 1:
            raise errors.ConfigError(f"train.{name} must be >= 1, got {config.train[name]}")
    if config.log.every < 1:
        raise errors.ConfigError(f"log.every must be >= 1, got {config.log.every}")
    for name, low in (("every", 0), ("keep", 1), ("restore_step", -1)):
        if config.checkpoint[name] < low:
            raise errors.ConfigError(
                f"checkpoint.{name} must be >= {low}, got {config.checkpoint[name]}"
            )
    if not 0 <= config.train.ema_decay < 1:
        raise errors.ConfigError(
            f"train.ema_decay must be in [0, 1) (0 = no EMA), got {config.train.ema_decay}"
        )
    if not 0 <= config.data.caption_dropout < 1:
        raise errors.ConfigError(
            f"data.caption_dropout must be in [0, 1), got {config.data.caption_dropout}"
        )
    validation.validate_config(config)
    buckets = buckets_lib.resolve(config.data.buckets, config.model.resolution)
    if buckets and config.data.cache_latents:
        raise errors.ConfigError(
            "data.cache_latents does not combine with data.buckets: the latent cache holds "
            "square images at model.resolution; turn one of them off"
        )
    if config.sample.every < 0:
        raise errors.ConfigError(f"sample.every must be >= 0, got {config.sample.every}")
    if config.sample.every:
        if any(not p.strip() for p in config.sample.prompts):
            raise errors.ConfigError(f"sample.prompts has an empty prompt: {config.sample.prompts}")
        try:  # Checked now, not when the first samples are due.
            sampling.SamplerSettings.from_config(config.sample)
        except ValueError as e:
            raise errors.ConfigError(f"sample (drawn during training): {e}") from e
    if "{caption}" not in config.train.prompt_template:
        raise errors.ConfigError(
            f"train.prompt_template {config.train.prompt_template!r} has no {{caption}}"
        )
    if config.train.mode == "nsync":
        _validate_negatives(config)
    unet_memory.MemoryOptions.from_config(config.model)  # Attention and remat names.
    diffusion.LossOptions.from_config(config.train)  # Timestep range, offset, min-SNR-γ.
    optim.check_config(config)  # Optimizer and schedule names, warm-up, final fraction.
    if config.model.frozen_dtype and config.model.frozen_dtype not in models.DTYPES:
        raise errors.ConfigError(
            f"model.frozen_dtype={config.model.frozen_dtype!r} is not one of {('', *models.DTYPES)}"
        )
    _validate_styles(config)


def _validate_styles(config: ml_collections.ConfigDict) -> None:
    """`data.styles` entries, and the SupCon term that needs their labels."""
    several = styles.parse(config.data)
    if several and "{style}" not in config.train.prompt_template:
        raise errors.ConfigError(
            f"data.styles gives each style its word, but train.prompt_template "
            f"{config.train.prompt_template!r} has no {{style}}"
        )
    supcon = style_contrast.SupconSettings.from_config(config.train)
    if supcon.enabled and not several:
        raise errors.ConfigError(
            "train.supcon_weight > 0 contrasts style labels: set data.styles (several styles)"
        )
    if supcon.enabled and supcon.encoder != style_contrast.TINY_ENCODER:
        if not os.path.isdir(supcon.encoder):  # Before any data or weights are read.
            raise errors.NotFound(
                f"train.supcon_encoder={supcon.encoder!r} is not a folder: expected a Hugging "
                "Face CLIP folder (config.json + weights), e.g. the one of eval.cmmd_weights"
            )


def _validate_negatives(config: ml_collections.ConfigDict) -> None:
    """NSYNC needs negatives for the style set: the demo's own, or a generated store."""
    if config.negatives.source == "demo" and config.data.source != "demo":
        raise errors.ConfigError(
            f"train.mode='nsync' needs negatives for data.source={config.data.source!r}, but "
            "negatives.source='demo' only pairs with the demo set: generate a store with "
            "launch/generate_negatives.py, then pass --config.negatives.source=store "
            "--config.negatives.path=<store> (or train the baseline with "
            "--config.train.mode=finetune)"
        )


@dataclasses.dataclass
class Trainer:
    """Everything set up for a run; `train()` builds one and hands it to `loop.run`.

    `step_fn(state, batch) -> (state, metrics)` is compiled with explicit shardings and
    the state donated; `batch(step)` is step `step`'s global batch on the mesh.
    """

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    model: models.StableDiffusion
    scope: scope_lib.Scope
    state: step_lib.TrainState
    state_sharding: Any
    batches: pipeline.PairedBatches
    step_fn: Any
    val_batches: pipeline.PairedBatches | None = None  # Held-out images (`validation.py`).

    def batch(self, step: int) -> Any:
        return sharding.global_batch(self.mesh, self.batches.batch(step))

    def reseeded(self, seed: int, state: step_lib.TrainState) -> tuple[Trainer, Any]:
        """This trainer (same compiled step) with the data order and step key of `seed`,
        and `state` with that key: another seed of the same run without recompiling."""
        rng = jax.random.key_data(runs.run_keys(seed)[1])
        state = state.replace(rng=jax.device_put(rng, state.rng.sharding))
        return dataclasses.replace(self, batches=self.batches.with_seed(seed)), state


class StepPerBucket:
    """The jitted step compiled ahead of time once per batch image shape, that is once per
    aspect-ratio bucket (`data.buckets`), each compile logged and counted.

    Compiled where a shape is first met, on every process at the same step (the bucket of
    step s is a pure function of (seed, s)), then `hosts.compile_together` makes them meet.

    Args:
      jitted: `make_step_fn`'s step.
      expected: how many bucket shapes the batches can take (for the log line).
    """

    def __init__(self, jitted: Any, expected: int):
        self.jitted = jitted
        self.expected = expected
        self.compiled: dict[tuple[int, int], Any] = {}

    @property
    def compiles(self) -> int:
        return len(self.compiled)

    def __call__(self, state: step_lib.TrainState, batch: Any) -> Any:
        shape = tuple(batch["positive"]["pixels"].shape[-2:])
        step = self.compiled.get(shape)
        if step is None:
            step = hosts.compile_together(self.jitted, state, batch)
            self.compiled[shape] = step
            logging.info(
                "compiled step for bucket %s (%d of %d)",
                buckets_lib.name(shape),
                self.compiles,
                self.expected,
            )
        return step(state, batch)


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    """The run's mesh, checked against the batch size and the micro-batches."""
    devices = list(jax.devices() if devices is None else devices)
    # Named in every message: on many hosts, how the devices come about is the question.
    where = (
        f"{len(devices)} devices ({jax.process_count()} processes x "
        f"{jax.local_device_count()} local devices)"
        if jax.process_count() > 1
        else f"{len(devices)} devices"
    )
    try:
        mesh = sharding.make_mesh(config.mesh, devices)
    except ValueError as e:
        raise errors.ConfigError(f"{e} ({where}); set mesh.data and mesh.fsdp to fit") from e
    divisor = sharding.batch_divisor(mesh)
    if config.train.batch_size % divisor:
        raise errors.ConfigError(
            f"train.batch_size={config.train.batch_size} does not divide over the "
            f"{where} of mesh {dict(mesh.shape)}"
        )
    if config.train.batch_size % (divisor * config.train.grad_accum):
        raise errors.ConfigError(
            f"train.batch_size={config.train.batch_size} does not split into "
            f"train.grad_accum={config.train.grad_accum} micro-batches that each divide over "
            f"the {where} of mesh {dict(mesh.shape)}"
        )
    return mesh


@dataclasses.dataclass
class Built:
    """The model side of a run: what `build_state` makes from the base parameters."""

    model: models.StableDiffusion
    scope: scope_lib.Scope
    tx: Any
    state: step_lib.TrainState  # Arrays, or `jax.ShapeDtypeStruct`s if built abstract.
    state_sharding: Any
    auxiliary: tuple[step_lib.AuxiliaryLoss, ...] = ()  # The SupCon term, if on.


def build_state(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    model: models.StableDiffusion,
    params: Any,
    abstract: bool = False,
) -> Built:
    """Scope split, optimizer and the sharded initial state, from the base parameters.

    With `abstract=True`, `params` may be `jax.ShapeDtypeStruct`s and the state is shapes
    with their shardings: nothing is allocated (memory reports compile from these).
    With `train.supcon_weight` > 0 the frozen image encoder's parameters join the frozen
    tree (`style_contrast.IMAGE_ENCODER`) and `Built.auxiliary` holds the SupCon term.
    """
    _, step_rng = runs.run_keys(config.seed)
    tx = optim.make_optimizer(config)
    negative_every = step_lib.negative_every(config)
    supcon = style_contrast.SupconSettings.from_config(config.train)
    encoder = None
    if supcon.enabled:
        encoder, encoder_params = style_contrast.load_encoder(supcon, config.seed)
        if abstract:
            encoder_params = jax.eval_shape(lambda: encoder_params)
        params = {**params, style_contrast.IMAGE_ENCODER: encoder_params}
    made = {}

    def split(params):
        scope, scoped_model, params = scope_lib.make_scope(
            config.train, model, params, config.lora, runs.run_style_tokens(config)
        )
        made.update(scope=scope, model=scoped_model)
        trainable, frozen = scope.split(params)
        return trainable, runs.frozen_for_training(config, frozen)

    if abstract:
        trainable, frozen = jax.eval_shape(split, params)
    else:
        trainable, frozen = split(params)

    def init(trainable, frozen):
        return step_lib.init_state(
            trainable,
            frozen,
            tx,
            step_rng,
            carry_negative=negative_every > 1,
            ema=config.train.ema_decay > 0,
        )

    state_shapes = jax.eval_shape(init, trainable, frozen)
    state_sharding = sharding.tree_shardings(mesh, state_shapes)
    if abstract:
        state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            state_shapes,
            state_sharding,
        )
    else:
        state = jax.jit(init, out_shardings=state_sharding)(trainable, frozen)
    auxiliary = ()
    if supcon.enabled:
        options = diffusion.LossOptions.from_config(config.train)
        auxiliary = (style_contrast.make_auxiliary(supcon, made["model"], encoder, options),)
    return Built(made["model"], made["scope"], tx, state, state_sharding, auxiliary)


def make_step_fn(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, built: Built) -> Any:
    """The train step jitted with explicit shardings and the state donated."""
    step = step_lib.make_train_step(
        built.model,
        built.scope,
        built.tx,
        config.train,
        trainable_shardings=built.state_sharding.trainable,
        negative_every=step_lib.negative_every(config),
        grad_accum=config.train.grad_accum,
        auxiliary=built.auxiliary,
        ema_decay=config.train.ema_decay,
    )
    return jax.jit(
        step,
        in_shardings=(built.state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(built.state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def setup(
    config: ml_collections.ConfigDict,
    devices=None,
    base: tuple[models.StableDiffusion, Any] | None = None,
) -> Trainer:
    """Builds mesh, data, model, scope, optimizer, sharded state, batches, the compiled step.

    Args:
      config: the run's config.
      devices: all of them by default; tests pass a subset to compare mesh layouts.
      base: `(model, params)` as `runs.build_base(config)` gives them, already built (and
        left unchanged: scopes copy what they change), for many set-ups of one base model;
        None builds it here.
    """
    validate_config(config)
    mesh = make_mesh(config, devices)
    logging.info("%s", hosts.describe(mesh))
    positives, style_index = sources.load_styled(config.data, config.model.resolution)
    held_out = None
    if config.data.val_count:
        positives, held_out = validation.split_validation(
            positives, config.data.val_count, config.seed
        )
    negatives = None
    if config.train.mode == "nsync":
        negatives = sources.load_negatives(config.negatives, config.data, config.model.resolution)
    if base is None:
        base = runs.build_base(
            config, shardings_fn=lambda tree: sharding.tree_shardings(mesh, tree)
        )
    model, params = base
    del base
    # Before the state is built: a bucket the model cannot take fails at once.
    buckets = buckets_lib.resolve(config.data.buckets, config.model.resolution)
    multiple = models.side_multiple(model.unet, model.vae)
    buckets_lib.check_multiple(
        buckets, multiple, f"the VAE and the UNet halve each side {multiple.bit_length() - 1} times"
    )
    built = build_state(config, mesh, model, params)
    del params
    model, scope, state = built.model, built.scope, built.state
    # Built (not compiled: jit is lazy) before any latent caching, so a setting the model
    # cannot take, such as a timestep range past its schedule, fails first.
    step_fn = make_step_fn(config, mesh, built)

    supcon = style_contrast.SupconSettings.from_config(config.train)
    view_template = None
    if supcon.enabled and supcon.views == "captions":
        view_template = supcon.view_template

    def paired(positives, negatives, random_flip, caption_dropout, buckets=()):
        return pipeline.PairedBatches(
            positives,
            negatives,
            tokenize=model.tokenize,
            prompt_template=config.train.prompt_template,
            style_token=config.train.style_token,
            global_batch_size=config.train.batch_size,
            seed=config.seed,
            random_flip=random_flip,
            on_bad_image=config.data.on_bad_image,
            caption_dropout=caption_dropout,
            buckets=buckets,
            styles=style_index,
            view_template=view_template,
        )

    batches = paired(
        positives, negatives, config.data.random_flip, config.data.caption_dropout, buckets
    )
    # Validation scores fixed inputs: no flips, no dropped captions, square images.
    val_batches = None if held_out is None else paired(held_out, None, False, 0.0)
    if config.data.cache_latents:
        # The VAE is frozen in every scope, so its posterior moments never change.
        if model.identity_vae:
            raise errors.ConfigError(
                "data.cache_latents needs a VAE; model.tiny.identity_vae has none"
            )
        if "vae" not in state.frozen:
            raise errors.ConfigError(
                f"data.cache_latents needs a frozen VAE; scope {scope.name} trains it"
            )
        vae_params = state.frozen["vae"]
        moments = jax.jit(functools.partial(step_lib.posterior_moments, model))
        for cached in (batches, val_batches):
            if cached is not None:
                cached.cache_latents(
                    lambda px: moments(vae_params, px),
                    config.data.latent_batch_size,
                    config.model.resolution,
                )
    if buckets:
        step_fn = StepPerBucket(step_fn, len(batches.bucket_shapes))
    elif jax.process_count() > 1:
        # Compiled here, and every process waits for the others: the first step's
        # collectives must start together on CPU (`hosts.sync`).
        step_fn = hosts.compile_together(
            step_fn, state, sharding.global_batch(mesh, batches.batch(0))
        )
    return Trainer(
        config, mesh, model, scope, state, built.state_sharding, batches, step_fn, val_batches
    )


def _resume_step(config: ml_collections.ConfigDict, workdir: str, steps: list[int]) -> int | None:
    """The checkpoint to resume from: the newest, or `checkpoint.restore_step` if set."""
    wanted = config.checkpoint.restore_step
    if wanted < 0:
        return steps[-1] if steps else None
    where = checkpoint.checkpoint_dir(workdir)
    if wanted not in steps:
        raise errors.NotFound(
            f"checkpoint.restore_step={wanted}: no such checkpoint in {where}; saved: {steps}"
        )
    newer = [s for s in steps if s > wanted]
    if newer:
        # Training on from an older step would collide with (and be silently skipped by
        # orbax at) the newer steps; the user decides what happens to them.
        raise errors.ConfigError(
            f"checkpoint.restore_step={wanted} but newer checkpoints {newer} exist in "
            f"{where}; move them away (or use a new workdir) to train on from step {wanted}"
        )
    return wanted


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    devices=None,
    config_file: str | None = None,
    base: tuple[models.StableDiffusion, Any] | None = None,
) -> step_lib.TrainState:
    """Runs `config` in `workdir`, resuming from its latest checkpoint if there is one.

    Saves every `checkpoint.every` steps, at the end, and on SIGTERM or Ctrl-C (then stops
    early; rerun the same command to resume). Returns the final state; after a Ctrl-C the
    save completes and `KeyboardInterrupt` is raised. Metrics go to the workdir, and with
    `sample.every` the pictures of the run (`previews.py`); it ends with `run_summary`.

    On many processes, every one calls this: they check first that they run the same
    config and that `workdir` is one shared folder (`hosts`). `base` is `setup`'s: the base
    model already built (a resume still checks it against the checkpoint's fingerprint).
    """
    hosts.check_same_config(config)
    validate_config(config)
    hosts.check_shared_dir(workdir, "--workdir")
    resume_step = _resume_step(config, workdir, checkpoint.saved_steps(workdir))
    meta = None
    if resume_step is not None:  # A changed config stops here, before anything is built.
        meta = checkpoint.check_resumable(workdir, resume_step, config)
    trainer = setup(config, devices, base)
    os.makedirs(workdir, exist_ok=True)
    # Created only now, so a set-up error leaves no async machinery behind, and closed on
    # every way out: a save in flight completes (or raises) before the function returns.
    manager = checkpoint.make_manager(workdir, keep=config.checkpoint.keep)
    try:
        return _run(config, workdir, trainer, manager, resume_step, meta, config_file)
    finally:
        manager.wait_until_finished()
        manager.close()


def run_summary(
    config: ml_collections.ConfigDict,
    workdir: str,
    start: int,
    end: int,
    seconds: float,
    log: loop.LogMetrics,
    stopped_by: str | None = None,
    config_file: str | None = None,
) -> str:
    """The block a run ends with: what it did, where its checkpoint is, what to run next."""
    images = (end - start) * log.images_per_step
    minutes, secs = divmod(round(seconds), 60)
    if stopped_by:
        how = f"stopped by {stopped_by} at step {end}: resume with the same command"
    else:
        how = "finished"
    lines = [
        f"run summary ({workdir})",
        f"  steps      {start} -> {end} of {config.train.num_steps}, {how}",
        f"  time       {minutes}m{secs:02d}s, {(end - start) / max(seconds, 1e-9):.3g} steps/s, "
        f"{images / max(seconds, 1e-9):.3g} images/s",
    ]
    if log.last:
        losses = [k for k in log.last if k.startswith("loss") or k == "val_loss"]
        final = ", ".join(f"{k} {log.last[k]:.4g}" for k in losses)
        best = ", ".join(f"{k} {v:.4g} at step {s}" for k, (v, s) in log.best.items())
        lines += [f"  final      {final} (the last log interval)", f"  best       {best}"]
    lines.append(f"  checkpoint {checkpoint.step_dir(workdir, end)}")
    if os.path.isdir(os.path.join(workdir, previews.SAMPLES_DIR)):
        lines.append(f"  samples    {os.path.join(workdir, previews.SAMPLES_DIR)}")
    lines += [
        "  next       python launch/export.py "
        f"--workdir {workdir} --output {os.path.join(workdir, 'export')}",
        f"             python launch/sample.py --config {config_file or 'CONFIG'} "
        f"--workdir {workdir} --out {os.path.join(workdir, 'final-samples')} --prompt "
        + shlex.quote(
            config.train.prompt_template.format(
                caption=previews.UNSEEN_CAPTION,
                style=styles.run_tokens(config.data, config.train.style_token)[0],
            )
        ),
    ]
    return "\n".join(lines)


def _run(
    config: ml_collections.ConfigDict,
    workdir: str,
    trainer: Trainer,
    manager: Any,
    resume_step: int | None,
    meta: dict[str, Any] | None,
    config_file: str | None = None,
) -> step_lib.TrainState:
    """Restores (if resuming), then runs the loop until the end or a stop signal."""
    # The run's model only: the SupCon encoder is named by the config, which is checked.
    frozen_summary = checkpoint.tree_summary(style_contrast.model_part(trainer.state.frozen))
    data = checkpoint.data_fingerprint(trainer.batches)
    state = trainer.state
    if resume_step is not None:
        logging.info(
            "resuming from step %d (%s)", resume_step, checkpoint.step_dir(workdir, resume_step)
        )
        state = checkpoint.restore_state(
            manager, workdir, resume_step, meta, state, frozen_summary, data
        )
    start = int(jax.device_get(state.step))
    logging.info(
        "training %s (%s scope) for %d steps on mesh %s; %d style images%s",
        config.train.mode,
        config.train.scope,
        config.train.num_steps,
        dict(trainer.mesh.shape),
        len(trainer.batches),
        f" ({len(trainer.val_batches)} more held out)" if trainer.val_batches else "",
    )
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    images_per_step = config.train.batch_size * (2 if config.train.mode == "nsync" else 1)

    def save(step: int, state: step_lib.TrainState) -> None:
        loop.check_finite(state)  # Never save a state past a non-finite value.
        checkpoint.save(manager, state, config, frozen_summary, data)

    bar = loop.ProgressBar(start, config.train.num_steps)
    writer = metrics_lib.MetricWriter(workdir, start_step=start)
    log = loop.LogMetrics(
        writer, config.log.every, images_per_step, start, bar=bar, num_steps=config.train.num_steps
    )
    hooks = [bar]
    if trainer.val_batches is not None:  # Before `log`: val_loss goes in its row.
        hooks.append(
            validation.Validation(
                trainer.val_batches,
                trainer.mesh,
                trainer.model,
                trainer.scope,
                config.seed,
                config.log.val_every,
                log,
            )
        )
    hooks += [
        log,
        loop.CheckFinite(config.log.every),
        loop.Callback(save, config.checkpoint.every, on_stop=True),
    ]
    if config.sample.every:  # After the save: a failure to draw loses no checkpoint.
        samples = previews.make_samples_hook(
            config,
            dataclasses.replace(trainer, state=state),
            workdir,
            writer,
            # The EMA when the run keeps one: what an export gives by default.
            lambda s: trainer.scope.merge(s.trainable if s.ema is None else s.ema, s.frozen),
        )
        hooks.append(samples)
        if start == 0 and config.train.num_steps >= config.sample.every:
            samples(0, state)  # The base model: where the progression starts.
    watcher = loop.PreemptionWatcher()
    hosts.sync("the first step")  # After per-process work (restore checks, compiles).
    tick = time.perf_counter()
    with watcher:
        state = loop.run(trainer, state, config.train.num_steps, hooks, watcher)
    end = int(jax.device_get(state.step))
    if watcher.received:
        logging.warning(
            "%s: saved step %d to %s; rerun the same command to resume",
            "interrupted" if watcher.interrupted else "preempted",
            end,
            checkpoint.step_dir(workdir, end),
        )
    if jax.process_index() == 0:
        logging.info(
            "%s",
            run_summary(
                config,
                workdir,
                start,
                end,
                time.perf_counter() - tick,
                log,
                watcher.received,
                config_file,
            ),
        )
    if watcher.interrupted:
        manager.wait_until_finished()  # The save completes before the interrupt goes on.
        raise KeyboardInterrupt
    return state
