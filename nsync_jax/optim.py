"""The optimizer of a run, built by name from config: [NSYNC projection] → clip → optimizer.

The projection goes first so that clipping and the optimizer's statistics see only the
projected gradient u, never the raw g+ (METHOD.md: "Only u reaches the optimizer").

Optimizers (`optim.name`, optax's): `adamw` (the reference), `adafactor`, `lion`, `sgd`.
Learning-rate schedules (`optim.schedule`) run over the run's `train.num_steps` updates:
a linear warm-up from 0 over `optim.warmup_steps`, then `constant`, `linear` or `cosine`
decay to `optim.final_lr_fraction` of the peak at the last step; `warmup_cosine` is
optax's `warmup_cosine_decay_schedule`, the cosine curve that insists on a warm-up.
"""

from __future__ import annotations

import ml_collections
import optax

from nsync_jax import errors, projection

MODES = ("finetune", "nsync")
OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
SCHEDULES = ("constant", "linear", "cosine", "warmup_cosine")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` naming the `optim` field (or `train.mode`) that cannot work."""
    optim = config.optim
    if config.train.mode not in MODES:
        raise errors.ConfigError(f"train.mode={config.train.mode!r}: expected one of {MODES}")
    if optim.name not in OPTIMIZERS:
        raise errors.ConfigError(f"optim.name={optim.name!r}: expected one of {OPTIMIZERS}")
    if optim.schedule not in SCHEDULES:
        raise errors.ConfigError(f"optim.schedule={optim.schedule!r}: expected one of {SCHEDULES}")
    if optim.learning_rate < 0:
        raise errors.ConfigError(f"optim.learning_rate must be >= 0, got {optim.learning_rate}")
    if optim.warmup_steps < 0:
        raise errors.ConfigError(f"optim.warmup_steps must be >= 0, got {optim.warmup_steps}")
    if not 0 <= optim.final_lr_fraction <= 1:
        raise errors.ConfigError(
            f"optim.final_lr_fraction must be in [0, 1], got {optim.final_lr_fraction}"
        )
    if optim.schedule == "constant":
        if optim.final_lr_fraction:
            raise errors.ConfigError(
                f"optim.final_lr_fraction={optim.final_lr_fraction} has no effect with "
                "optim.schedule='constant': choose 'linear', 'cosine' or 'warmup_cosine'"
            )
        return
    if optim.warmup_steps >= config.train.num_steps:
        raise errors.ConfigError(
            f"optim.schedule={optim.schedule!r} decays after optim.warmup_steps="
            f"{optim.warmup_steps}, which leaves none of train.num_steps="
            f"{config.train.num_steps}"
        )
    if optim.schedule == "warmup_cosine" and optim.warmup_steps < 1:
        raise errors.ConfigError(
            "optim.schedule='warmup_cosine' needs optim.warmup_steps >= 1 (without a warm-up "
            "it is 'cosine')"
        )


def learning_rate(optim_config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """The learning rate at each update count, for a run of `num_steps` updates.

    Linear warm-up 0 → `learning_rate` over `warmup_steps`, then the named shape, which
    reaches `learning_rate · final_lr_fraction` at `num_steps` (and stays there).
    """
    peak, warmup = optim_config.learning_rate, optim_config.warmup_steps
    final = peak * optim_config.final_lr_fraction
    name = optim_config.schedule
    if name not in SCHEDULES:
        raise ValueError(f"optim.schedule={name!r}: expected one of {SCHEDULES}")
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, num_steps, end_value=final)
    if name == "constant":
        body = optax.constant_schedule(peak)
    elif name == "linear":
        body = optax.linear_schedule(peak, final, num_steps - warmup)
    else:
        body = optax.cosine_decay_schedule(
            peak, num_steps - warmup, alpha=optim_config.final_lr_fraction
        )
    if warmup == 0:
        return body
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), body], [warmup])


def base_optimizer(
    optim_config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """The optimizer named by `optim.name`, stepping by `schedule`.

    What each reads of `optim`: `adamw` b1, b2, eps, weight_decay (decoupled); `lion` b1,
    b2, weight_decay (decoupled); `adafactor` weight_decay (decoupled); `sgd` b1 as
    momentum (0: none) and weight_decay as an L2 term added to the gradient, as
    `torch.optim.SGD` does. Decoupled decay moves each weight by −lr·weight_decay·w.

    `adafactor` is `optax.adafactor(schedule, multiply_by_parameter_scale=False)` (an
    explicit learning rate, no parameter scaling: kohya's `relative_step=False,
    scale_parameter=False`) with its weight decay placed as in `optax.adamw`, before the
    learning rate: `optax.adafactor`'s own `weight_decay_rate` comes after it, so it would
    move each weight by −weight_decay·w per step, 1/lr times more than every other
    optimizer here (and than transformers' Adafactor, which kohya uses).
    """
    o = optim_config
    if o.name == "adamw":
        return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "lion":
        return optax.lion(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
    if o.name == "adafactor":
        return optax.chain(
            optax.scale_by_factored_rms(),  # optax.adafactor's defaults, as its parts.
            optax.clip_by_block_rms(1.0),
            optax.add_decayed_weights(o.weight_decay),
            optax.scale_by_learning_rate(schedule),
        )
    if o.name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(o.weight_decay), optax.sgd(schedule, momentum=o.b1 or None)
        )
    raise ValueError(f"optim.name={o.name!r}: expected one of {OPTIMIZERS}")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """`optax.chain` for `config.train.mode`; nsync's update needs `negative_updates=`."""
    check_config(config)
    optim = config.optim
    parts = []
    if config.train.mode == "nsync":
        parts.append(
            projection.nsync_projection(
                rule=config.nsync.rule, granularity=config.nsync.granularity, eps=config.nsync.eps
            )
        )
    if optim.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.clip_norm))
    parts.append(base_optimizer(optim, learning_rate(optim, config.train.num_steps)))
    return optax.chain(*parts)
