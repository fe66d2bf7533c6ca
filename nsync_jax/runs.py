"""A run's model, rebuilt the one way: the base model as training builds it, and a trained
run from its workdir (saved config + checkpointed trainable parameters).

Training, negatives generation, sampling and export all go through here, so the tiny
model's random init, the scope's placeholder token and the frozen-parameter check cannot
drift apart between them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from nsync_jax import errors, hosts, models, weights
from nsync_jax import scope as scope_lib
from nsync_jax.data import styles

Params = dict[str, Any]
# "tiny": small random model from `model.tiny`; "random": a published architecture
# (`model.architecture`) with random weights; "pretrained": a diffusers folder or hub id.
MODEL_SOURCES = ("tiny", "random", "pretrained")


def run_style_tokens(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The run's style words: one per style of `data.styles`, else `train.style_token`."""
    return styles.run_tokens(config.data, config.train.style_token)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(model init key, step key) of a run: the step key is what the loop folds steps into."""
    init_rng, step_rng = jax.random.split(jax.random.key(seed))
    return init_rng, step_rng


def build_model(
    model_config: ml_collections.ConfigDict, rng: jax.Array, shardings_fn=None
) -> tuple[models.StableDiffusion, Params]:
    """Builds the model named by `model_config.source` (`MODEL_SOURCES`).

    `shardings_fn` (parameter shapes -> shardings) lets `pretrained` place each loaded
    tensor straight into its shards; `tiny` ignores it (its params are small).
    """
    if model_config.source == "tiny":
        return models.build_tiny(model_config, rng)
    if model_config.source == "random":
        return models.build_random(model_config, rng)
    if model_config.source == "pretrained":
        return weights.load_pretrained(model_config, shardings_fn)
    raise errors.ConfigError(
        f"model.source={model_config.source!r}: expected one of {MODEL_SOURCES}"
    )


def build_base(
    config: ml_collections.ConfigDict, shardings_fn=None
) -> tuple[models.StableDiffusion, Params]:
    """The frozen base model and its parameters, as `train.setup` builds them.

    With `model.init_from` set, the base is that trained run (its model and merged
    parameters, the EMA ones if it kept an EMA, checked against its checkpoint), e.g. a
    model pretrained by this trainer.
    """
    if config.model.init_from:
        base = load_trained(config.model.init_from)
        if base.config.model.resolution != config.model.resolution:
            raise ValueError(
                f"model.init_from={config.model.init_from!r} trained at resolution "
                f"{base.config.model.resolution}, this run has {config.model.resolution}"
            )
        return base.model, base.params
    return build_model(config.model, run_keys(config.seed)[0], shardings_fn=shardings_fn)


def frozen_for_training(config: ml_collections.ConfigDict, frozen: Params) -> Params:
    """The frozen parameters as the trainer holds them: cast to `model.frozen_dtype` if
    set (e.g. a bf16 copy of the base, half the memory; the trained part stays in
    `model.param_dtype`)."""
    if not config.model.frozen_dtype:
        return frozen
    return models.cast_floating(frozen, models.dtype_from_name(config.model.frozen_dtype))


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A checkpointed run: its config, model (scope applied), and parameters.

    `trainable` holds the trained parameters or, if `ema`, their moving average.
    """

    config: ml_collections.ConfigDict
    model: models.StableDiffusion
    scope: scope_lib.Scope
    trainable: Any
    frozen: Params
    step: int
    ema: bool = False

    @property
    def params(self) -> Params:
        return self.scope.merge(self.trainable, self.frozen)


def load_trained(
    workdir: str,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    ema: bool | None = None,
) -> TrainedRun:
    """Rebuilds the run in `workdir` at checkpoint `step` (the newest if None).

    The frozen parameters are rebuilt, not saved, so they are checked against the
    fingerprint the checkpoint holds; a different base model or seed is an error.

    Args:
      workdir: the training run's directory.
      step: which checkpoint; None for the newest.
      config: the run's config; None reads the one saved with the checkpoint.
      ema: True for the EMA of the trained parameters (an error if the run kept none),
        False for the trained parameters themselves, None for the EMA when the run kept
        one (`train.ema_decay > 0`).
    """
    from nsync_jax import checkpoint  # Only trained runs need orbax.

    if config is None:
        config = checkpoint.load_run_config(workdir, step)
    kept_ema = config.train.ema_decay > 0
    if ema is None:
        ema = kept_ema
    if ema and not kept_ema:
        raise errors.ConfigError(
            f"the run in {workdir} kept no EMA of its weights (train.ema_decay=0): ask for "
            "its raw weights instead"
        )
    model, params = build_base(config)
    hosts.sync("the base model built")  # Orbax's reads below use collectives (CPU: gloo).
    scope, model, params = scope_lib.make_scope(
        config.train, model, params, config.lora, run_style_tokens(config)
    )
    trainable, frozen = scope.split(params)
    trainable, step = checkpoint.restore_trainable(
        workdir, checkpoint.abstract_like(trainable), step, field="ema" if ema else "trainable"
    )
    saved_frozen = checkpoint.load_metadata(workdir, step)["frozen"]
    # Training held the frozen parts as `frozen_for_training` makes them; the returned
    # run keeps them in full precision.
    live = checkpoint.tree_summary(frozen_for_training(config, frozen))
    problems = checkpoint.compare_summaries(saved_frozen, live)
    if problems:
        raise ValueError(
            f"the rebuilt frozen parameters differ from those that trained step {step} in "
            f"{workdir} (model source or seed changed?): {problems[:5]}"
        )
    return TrainedRun(config, model, scope, trainable, frozen, step, ema)
