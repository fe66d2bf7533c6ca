"""The optimizer of a run, built by name from config: [NSYNC projection] → clip → AdamW.

The projection goes first so that clipping and Adam's statistics see only the projected
gradient u, never the raw g+ (METHOD.md: "Only u reaches the optimizer").
"""

from __future__ import annotations

import ml_collections
import optax

from nsync_jax import projection

MODES = ("finetune", "nsync")


def learning_rate(optim_config: ml_collections.ConfigDict) -> optax.Schedule:
    """Constant (the reference) with optional linear warm-up."""
    if optim_config.schedule != "constant":
        raise ValueError(f"optim.schedule={optim_config.schedule!r}: only 'constant' exists")
    lr = optim_config.learning_rate
    if optim_config.warmup_steps > 0:
        return optax.linear_schedule(0.0, lr, optim_config.warmup_steps)
    return optax.constant_schedule(lr)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """`optax.chain` for `config.train.mode`; nsync's update needs `negative_updates=`."""
    optim = config.optim
    if config.train.mode not in MODES:
        raise ValueError(f"train.mode={config.train.mode!r}: expected one of {MODES}")
    parts = []
    if config.train.mode == "nsync":
        parts.append(
            projection.nsync_projection(
                rule=config.nsync.rule, granularity=config.nsync.granularity, eps=config.nsync.eps
            )
        )
    if optim.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.clip_norm))
    parts.append(
        optax.adamw(
            learning_rate(optim),
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
    )
    return optax.chain(*parts)
