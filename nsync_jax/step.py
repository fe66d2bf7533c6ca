"""The training state and the pure training step for `finetune` and `nsync`.

`make_train_step(...)` returns `step(state, batch, rng) -> (state, metrics)`, compiled once
by the loop with explicit shardings and the state donated. Each branch is one call of the
same diffusion loss: the positive batch gives g+, the negative batch g−; the optimizer
(`optim.make_optimizer`) projects g+ against g− before clipping and AdamW. Two calls rather
than a `vmap` over branches: equal gradients, and faster on CPU (DESIGN.md).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from nsync_jax import diffusion, models
from nsync_jax.scope import Scope

Batch = dict[str, dict[str, jax.Array]]


@flax.struct.dataclass
class TrainState:
    """Everything the step reads and writes.

    Attributes:
      step: number of updates applied so far.
      trainable: the parameters the scope trains (FSDP-sharded).
      frozen: the rest of the model, never updated (FSDP-sharded too).
      opt_state: optimizer state, for `trainable` only.
      nonfinite_step: first step whose loss or gradient was non-finite, -1 if none; the
        loop reads it at log and save time, so it names the step without a per-step sync.
      negative: the last negative branch `{"grad": g−, "loss": scalar}` when g− is
        amortized (`nsync.negative_every > 1`), else None. `grad` has the structure and
        shardings of `trainable`; checkpoints save it, so a resume mid-period reuses the
        same g− an uninterrupted run would.
    """

    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: optax.OptState
    nonfinite_step: jax.Array
    negative: Any = None


def init_state(
    trainable: Any, frozen: Any, tx: optax.GradientTransformation, carry_negative: bool = False
) -> TrainState:
    """The state before step 0; `carry_negative` adds the (zero) amortized g− slot."""
    negative = None
    if carry_negative:
        negative = {
            "grad": jax.tree.map(jnp.zeros_like, trainable),
            "loss": jnp.zeros((), jnp.float32),
        }
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        frozen=frozen,
        opt_state=tx.init(trainable),
        nonfinite_step=jnp.full((), -1, jnp.int32),
        negative=negative,
    )


def posterior_moments(
    model: models.StableDiffusion, vae_params: Any, pixels: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(mean, std) of the VAE posterior of NCHW `pixels`, in the encoder's NHWC layout and
    unscaled: what `data/latents.py` caches and `sample_posterior` draws from."""
    posterior = model.vae.apply({"params": vae_params}, pixels, method=model.vae.encode)
    return posterior.latent_dist.mean, posterior.latent_dist.std


def sample_posterior(
    model: models.StableDiffusion, mean: jax.Array, std: jax.Array, rng: jax.Array
) -> jax.Array:
    """Scaled NCHW latents `mean + std·ε`, drawn exactly as `model.encode_images` draws
    them (same ε for the same rng), so the cached and pixel paths agree."""
    latents = mean + std * jax.random.normal(rng, mean.shape)
    return jnp.transpose(latents, (0, 3, 1, 2)) * model.vae.config.scaling_factor


def negative_every(config: ml_collections.ConfigDict) -> int:
    """Steps between fresh g− (`nsync.negative_every`); 1 outside nsync mode."""
    if config.train.mode != "nsync":
        return 1
    every = config.nsync.negative_every
    if every < 1:
        raise ValueError(f"nsync.negative_every must be >= 1, got {every}")
    return every


def make_branch_loss(
    model: models.StableDiffusion, scope: Scope, schedule: diffusion.NoiseSchedule
):
    """`loss(trainable, frozen, branch, rng, noise_rng)`: the ε/v MSE on one batch.

    A branch holds `input_ids` and one of: `pixels` (encoded here), `latent_mean` and
    `latent_std` (cached posterior moments, `data/latents.py`), or `latents` (fixed).
    `rng` draws the VAE posterior sample; `noise_rng` draws noise and timesteps, so two
    branches can share noise by sharing `noise_rng`.
    """

    def loss(trainable, frozen, branch, rng, noise_rng):
        params = scope.merge(trainable, frozen)
        if "latent_mean" in branch:  # Cached by a frozen VAE; still a fresh sample per step.
            latents = sample_posterior(model, branch["latent_mean"], branch["latent_std"], rng)
        elif "latents" in branch:  # Precomputed by a frozen VAE.
            latents = branch["latents"]
        else:
            latents = model.encode_images(params["vae"], branch["pixels"], rng)
        latents = jax.lax.stop_gradient(latents)
        context = model.encode_text(params["text_encoder"], branch["input_ids"])
        noise, timesteps = diffusion.sample_noise(schedule, noise_rng, latents.shape)
        noised = diffusion.add_noise(schedule, latents, noise, timesteps)
        prediction = model.predict_noise(params["unet"], noised.noisy, timesteps, context)
        return diffusion.mse(prediction, noised.target)

    return loss


def make_train_step(
    model: models.StableDiffusion,
    scope: Scope,
    tx: optax.GradientTransformationExtraArgs,
    train_config: ml_collections.ConfigDict,
    trainable_shardings: Any = None,
    negative_every: int = 1,
):
    """The pure step `(state, batch, rng) -> (state, metrics)` for `train_config.mode`.

    Args:
      model: the Stable Diffusion parts.
      scope: splits and merges trainable and frozen parameters.
      tx: the optimizer; in `nsync` mode it takes `negative_updates=`.
      train_config: `config.train` (`mode`, `share_noise`).
      trainable_shardings: if given, gradients are constrained to these shardings so they
        stay FSDP-sharded like the parameters.
      negative_every: in `nsync` mode, compute g− only at steps divisible by this and
        reuse the one carried in `state.negative` in between (the state must have been
        made with `init_state(..., carry_negative=True)`). Saves a backward pass on
        k−1 of every k steps at the price of projecting against a g− up to k−1 updates
        (and k−1 noise draws) old. `jax.lax.cond` runs only the taken branch outside
        `vmap`, so the saving is real.
    """
    if negative_every < 1:
        raise ValueError(f"negative_every must be >= 1, got {negative_every}")
    schedule = diffusion.make_schedule(model.scheduler_config)
    grad_fn = jax.value_and_grad(make_branch_loss(model, scope, schedule))
    nsync = train_config.mode == "nsync"

    def constrain(grads):
        if trainable_shardings is None:
            return grads
        return jax.lax.with_sharding_constraint(grads, trainable_shardings)

    def step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(rng, state.step)
        pos_rng, pos_noise, neg_rng, neg_noise = jax.random.split(rng, 4)
        if train_config.share_noise:
            neg_noise = pos_noise
        loss_pos, g_pos = grad_fn(
            state.trainable, state.frozen, batch["positive"], pos_rng, pos_noise
        )
        g_pos = constrain(g_pos)
        metrics = {"loss_pos": loss_pos, "grad_norm_pos": optax.tree.norm(g_pos)}
        extra = {}
        negative = state.negative
        if nsync:

            def fresh(_):
                loss, grad = grad_fn(
                    state.trainable, state.frozen, batch["negative"], neg_rng, neg_noise
                )
                return {"grad": constrain(grad), "loss": loss.astype(jnp.float32)}

            if negative_every == 1:
                negative = None
                computed = fresh(None)
            else:
                if state.negative is None:
                    raise ValueError("negative_every > 1 needs init_state(carry_negative=True)")
                computed = jax.lax.cond(
                    state.step % negative_every == 0, fresh, lambda _: state.negative, None
                )
                negative = computed
            loss_neg, g_neg = computed["loss"], computed["grad"]
            extra = {"negative_updates": g_neg}
            metrics.update(loss_neg=loss_neg, grad_norm_neg=optax.tree.norm(g_neg))
        updates, opt_state = tx.update(g_pos, state.opt_state, state.trainable, **extra)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics["update_norm"] = optax.tree.norm(updates)
        if nsync:
            metrics["cosine"] = optax.tree.get(opt_state, "cosine")
            metrics["coefficient"] = optax.tree.get(opt_state, "coefficient")
        finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in metrics.values()]))
        nonfinite_step = jnp.where(
            (state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step
        )
        new_state = state.replace(
            step=state.step + 1,
            trainable=trainable,
            opt_state=opt_state,
            nonfinite_step=nonfinite_step,
            negative=negative,
        )
        return new_state, metrics

    return step
