"""The training state and the pure training step, in two halves: gradients, then update.

`make_train_step(...)` returns `step(state, batch) -> (state, metrics)`, compiled once by
the loop with explicit shardings and the state donated. It is the composition of

- `gradients(state, batch, rng) -> (grads, metrics)`: the gradient of each branch, by name
  (`"positive"`: g+, `"negative"`: g− in `nsync` mode, `"unprojected"`: auxiliary losses
  that bypass the projection), accumulated over `grad_accum` micro-batches by a `lax.scan`;
- `apply(state, grads, metrics) -> (state, metrics)`: the optimizer update
  (`optim.make_optimizer`: the NSYNC projection of g+ against g−, clipping, the
  optimizer), the EMA of the parameters, the carried g−, and the non-finite record.

The RNG lives in the state: step s draws from `fold_in(state.rng, s)`, so a restored
state continues the same random stream and a checkpoint needs no separate key.

Each branch is one call of the same diffusion loss; two calls rather than a `vmap` over
branches: equal gradients, and faster on CPU (DESIGN.md). All random draws of a step
(posterior sample, noise, timesteps) are made for the whole batch before it is split
into micro-batches, so `grad_accum = k` computes the gradient of the same batch as one
pass, only in k pieces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from nsync_jax import diffusion, models, projection
from nsync_jax.scope import Scope

Batch = dict[str, dict[str, jax.Array]]
Grads = dict[str, Any]  # Branch name -> a gradient with the structure of `trainable`.
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything the step reads and writes; a checkpoint is `saved()` of it.

    Attributes:
      step: number of updates applied so far.
      rng: the run's step key as raw key data (uint32); step s folds s into it.
      trainable: the parameters the scope trains (FSDP-sharded).
      frozen: the rest of the model, never updated (FSDP-sharded too); rebuilt from the
        model source on resume, never saved.
      opt_state: optimizer state, for `trainable` only.
      nonfinite_step: first step whose loss or gradient was non-finite, -1 if none; the
        loop reads it at log and save time, so it names the step without a per-step sync.
      negative: the last negative branch `{"grad": g−, "loss": scalar}` when g− is
        amortized (`nsync.negative_every > 1`), else None. `grad` has the structure and
        shardings of `trainable`; checkpoints save it, so a resume mid-period reuses the
        same g− an uninterrupted run would.
      ema: the exponential moving average of `trainable` (`ema_update`) when
        `train.ema_decay > 0`, else None (no leaves: nothing saved, nothing sharded).
        Same structure, dtypes and shardings as `trainable`; checkpoints save it.
    """

    step: jax.Array
    rng: jax.Array
    trainable: Any
    frozen: Any
    opt_state: optax.OptState
    nonfinite_step: jax.Array
    negative: Any = None
    ema: Any = None

    def saved(self) -> TrainState:
        """What a checkpoint holds: everything but the frozen parameters."""
        return self.replace(frozen=None)

    def step_key(self) -> jax.Array:
        """The key of the step this state is at."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def init_state(
    trainable: Any,
    frozen: Any,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    carry_negative: bool = False,
    ema: bool = False,
) -> TrainState:
    """The state before step 0.

    Args:
      trainable, frozen: the scope's split of the parameters.
      tx: the optimizer.
      rng: the run's step key (`runs.run_keys(seed)[1]`); a typed key or raw key data.
      carry_negative: add the (zero) amortized g− slot.
      ema: keep an EMA of `trainable`, starting from a copy of it.
    """
    negative = None
    if carry_negative:
        negative = {
            "grad": jax.tree.map(jnp.zeros_like, trainable),
            "loss": jnp.zeros((), jnp.float32),
        }
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=rng,
        trainable=trainable,
        frozen=frozen,
        opt_state=tx.init(trainable),
        nonfinite_step=jnp.full((), -1, jnp.int32),
        negative=negative,
        ema=jax.tree.map(jnp.copy, trainable) if ema else None,
    )


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
    """The decay of the EMA update after update `step` (0 for the first):
    min(decay, (1 + t) / (10 + t)), the warm-up of diffusers' `EMAModel` (its default,
    without `use_ema_warmup`): 0.1 at the first update, 0.5 at t = 8, 0.9 at t = 80, so
    the average is not pinned to the initial weights for the first ~1/(1 − decay) steps."""
    t = step.astype(jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def ema_update(ema: Any, trainable: Any, decay: jax.Array) -> Any:
    """decay · ema + (1 − decay) · trainable, leaf by leaf, in each EMA leaf's dtype."""
    return jax.tree.map(
        lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, trainable
    )


def posterior_moments(
    model: models.StableDiffusion, vae_params: Any, pixels: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(mean, std) of the VAE posterior of NCHW `pixels`, in the encoder's NHWC layout and
    unscaled: what `data/latents.py` caches and `sample_posterior` draws from."""
    return model.posterior_moments(vae_params, pixels)


def sample_posterior(
    model: models.StableDiffusion, mean: jax.Array, std: jax.Array, rng: jax.Array
) -> jax.Array:
    """Scaled NCHW latents `mean + std·ε`, drawn exactly as `model.encode_images` draws
    them (same ε for the same rng), so the cached and pixel paths agree."""
    return _scaled_latents(model, mean, std, jax.random.normal(rng, mean.shape))


def _scaled_latents(
    model: models.StableDiffusion, mean: jax.Array, std: jax.Array, eps: jax.Array
) -> jax.Array:
    return model.latents_from_moments(mean, std, eps)


def negative_every(config: ml_collections.ConfigDict) -> int:
    """Steps between fresh g− (`nsync.negative_every`); 1 outside nsync mode."""
    if config.train.mode != "nsync":
        return 1
    every = config.nsync.negative_every
    if every < 1:
        raise ValueError(f"nsync.negative_every must be >= 1, got {every}")
    return every


# --- One branch: draws, then the loss --------------------------------------------------------


def _latent_shape_nchw(model: models.StableDiffusion, branch: dict[str, jax.Array]) -> tuple:
    if "latents" in branch:
        return branch["latents"].shape
    if "latent_mean" in branch:
        b, h, w, c = branch["latent_mean"].shape
        return (b, c, h, w)
    # From the pixels' own shape: with aspect-ratio buckets it is not the model's square.
    b, _, height, width = branch["pixels"].shape
    factor = model.vae_scale_factor
    return (b, model.latent_shape[0], height // factor, width // factor)


def make_draws(
    model: models.StableDiffusion,
    schedule: diffusion.NoiseSchedule,
    options: diffusion.LossOptions = diffusion.PLAIN,
) -> Callable[[dict, jax.Array, jax.Array], dict]:
    """`draws(branch, posterior_rng, noise_rng)`: every random number one branch needs.

    `posterior_rng` draws the VAE posterior sample ε (NHWC, as diffusers' `sample` draws
    it), `noise_rng` the diffusion noise (with `options.noise_offset`) and the timesteps
    (in `options`' range), so two branches can share noise by sharing `noise_rng`. Drawn
    for the whole batch, split with it into micro-batches.
    """
    options.timestep_range(schedule)  # A range the schedule cannot draw fails here.

    def draws(branch, posterior_rng, noise_rng):
        shape = _latent_shape_nchw(model, branch)
        noise, timesteps = diffusion.sample_noise(schedule, noise_rng, shape, options)
        out = {"noise": noise, "timesteps": timesteps}
        if "latents" not in branch and not model.identity_vae:
            b, c, h, w = shape
            out["posterior"] = jax.random.normal(posterior_rng, (b, h, w, c))
        return out

    return draws


def make_branch_forward(
    model: models.StableDiffusion,
    scope: Scope,
    schedule: diffusion.NoiseSchedule,
    options: diffusion.LossOptions = diffusion.PLAIN,
):
    """`forward(trainable, frozen, branch, draws) -> (loss, outputs)` on one batch.

    A branch holds `input_ids` and one of: `pixels` (encoded here), `latent_mean` and
    `latent_std` (cached posterior moments, `data/latents.py`), or `latents` (fixed).
    `loss` is the ε/v MSE, each example weighted by min-SNR-γ if `options` ask for it;
    `outputs` (`latents`, `noisy`, `timesteps`, `prediction`, `target`, `context`) are
    what an auxiliary loss may read.
    """

    def forward(trainable, frozen, branch, draws):
        params = scope.merge(trainable, frozen)
        if "latent_mean" in branch:  # Cached by a frozen VAE; still a fresh sample per step.
            latents = _scaled_latents(
                model, branch["latent_mean"], branch["latent_std"], draws["posterior"]
            )
        elif "latents" in branch:  # Precomputed by a frozen VAE.
            latents = branch["latents"]
        elif model.identity_vae:
            latents = model.encode_images(params["vae"], branch["pixels"], None)
        else:
            mean, std = posterior_moments(model, params["vae"], branch["pixels"])
            latents = _scaled_latents(model, mean, std, draws["posterior"])
        latents = jax.lax.stop_gradient(latents)
        context = model.encode_text(params["text_encoder"], branch["input_ids"])
        timesteps = draws["timesteps"]
        noised = diffusion.add_noise(schedule, latents, draws["noise"], timesteps)
        prediction = model.predict_noise(params["unet"], noised.noisy, timesteps, context)
        weights = None
        if options.min_snr_gamma > 0:
            weights = diffusion.min_snr_weights(schedule, timesteps, options.min_snr_gamma)
        loss = diffusion.mse(prediction, noised.target, weights)
        outputs = {
            "latents": latents,
            "noisy": noised.noisy,
            "timesteps": timesteps,
            "prediction": prediction,
            "target": noised.target,
            "context": context,
        }
        return loss, outputs

    return forward


def make_branch_loss(
    model: models.StableDiffusion, scope: Scope, schedule: diffusion.NoiseSchedule
):
    """`loss(trainable, frozen, branch, rng, noise_rng)`: the ε/v MSE on one batch, with
    its draws made from `rng` (posterior) and `noise_rng` (noise, timesteps)."""
    forward = make_branch_forward(model, scope, schedule)
    draws = make_draws(model, schedule)

    def loss(trainable, frozen, branch, rng, noise_rng):
        return forward(trainable, frozen, branch, draws(branch, rng, noise_rng))[0]

    return loss


@dataclasses.dataclass(frozen=True)
class AuxiliaryLoss:
    """A further weighted loss on the positive branch, beside the diffusion loss.

    Attributes:
      name: its metric is `loss_<name>`.
      weight: its gradient enters the update scaled by this.
      fn: `fn(params, branch, outputs, draws) -> scalar`, with the merged parameters, the
        positive branch, the diffusion forward's `outputs` (`make_branch_forward`) and
        this loss's own random draws (`{}` without `draws`).
      projected: True adds its gradient to g+ before the NSYNC projection (the projection
        then also removes its component along g−); False adds it after the projection,
        untouched (`grads["unprojected"]`). Without a projection (`finetune`) both add it
        to the gradient.
      draws: `draws(latent_shape, rng) -> {name: [B, ...] array}`, the further random
        numbers `fn` needs (a second noise draw); made for the whole batch with the
        branch's other draws, so micro-batches split them alike. None: no draws.
    """

    name: str
    weight: float
    fn: Callable[[Any, dict, dict, dict], jax.Array]
    projected: bool
    draws: Callable[[tuple[int, ...], jax.Array], dict] | None = None


# --- gradients ---------------------------------------------------------------------------------


def _split_micro(tree: Any, k: int) -> Any:
    """[B, ...] leaves to [k, B/k, ...]; micro-batch j takes rows j, k+j, 2k+j, ... so that
    each micro-batch stays spread over the devices that hold contiguous rows."""

    def split(x):
        b = x.shape[0] // k
        return jnp.swapaxes(x.reshape((b, k) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, tree)


def accumulate(fn: Callable[..., Any], k: int, *batched: Any) -> Any:
    """The mean of `fn(*micro)` over `k` micro-batches of `batched`, as one `lax.scan`.

    `fn` returns a pytree of arrays (losses and gradients); its mean over equal-sized
    micro-batches equals `fn` of the whole batch when `fn` averages over rows.
    """
    if k == 1:
        return fn(*batched)
    micro = _split_micro(batched, k)
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(fn, *first))

    def body(total, xs):
        out = fn(*xs)
        return jax.tree.map(jnp.add, total, out), None

    total, _ = jax.lax.scan(body, zeros, micro)
    return jax.tree.map(lambda x: x / k, total)


def make_gradients(
    model: models.StableDiffusion,
    scope: Scope,
    train_config: ml_collections.ConfigDict,
    trainable_shardings: Any = None,
    negative_every: int = 1,
    grad_accum: int = 1,
    auxiliary: tuple[AuxiliaryLoss, ...] = (),
):
    """`gradients(state, batch, rng) -> (grads, metrics)` for `train_config.mode`.

    Args:
      model: the Stable Diffusion parts.
      scope: splits and merges trainable and frozen parameters.
      train_config: `config.train` (`mode`, `share_noise`, and the `diffusion.LossOptions`
        fields: timestep range, noise offset, min-SNR-γ), the same for both branches.
      trainable_shardings: if given, gradients are constrained to these shardings so they
        stay FSDP-sharded like the parameters.
      negative_every: in `nsync` mode, compute g− only at steps divisible by this and
        reuse the one carried in `state.negative` in between (the state must have been
        made with `init_state(..., carry_negative=True)`). Saves a backward pass on
        k−1 of every k steps at the price of projecting against a g− up to k−1 updates
        (and k−1 noise draws) old. `jax.lax.cond` runs only the taken branch outside
        `vmap`, so the saving is real.
      grad_accum: micro-batches per step; each branch's gradient is the mean over them.
      auxiliary: further weighted losses on the positive branch (`AuxiliaryLoss`).

    Returns:
      `gradients`, whose `grads` hold `"positive"`, in nsync mode `"negative"`, and with an
      unprojected auxiliary loss `"unprojected"`; `metrics` hold `loss_pos`, `loss_neg`
      and `loss_<name>` of each auxiliary loss (unweighted); with auxiliary losses also
      `grad_norm_diffusion` (the diffusion loss's gradient alone), `grad_norm_aux` (the
      weighted auxiliary gradient, projected or not) and `cosine_aux`, their cosine.
    """
    if negative_every < 1:
        raise ValueError(f"negative_every must be >= 1, got {negative_every}")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    schedule = diffusion.make_schedule(model.scheduler_config)
    options = diffusion.LossOptions.from_config(train_config)
    forward = make_branch_forward(model, scope, schedule, options)
    draws_fn = make_draws(model, schedule, options)
    nsync = train_config.mode == "nsync"

    def constrain(grads):
        if trainable_shardings is None:
            return grads
        return jax.lax.with_sharding_constraint(grads, trainable_shardings)

    def plain_branch(trainable, frozen):
        """(losses, grads) of the diffusion loss alone."""

        def fn(branch, draws):
            loss, grad = jax.value_and_grad(lambda t: forward(t, frozen, branch, draws)[0])(
                trainable
            )
            return {"loss": loss}, {"grad": constrain(grad)}

        return fn

    any_projected = any(a.projected for a in auxiliary)
    any_bypass = any(not a.projected for a in auxiliary)

    def positive_branch(trainable, frozen):
        """(losses, grads) of the diffusion loss and the auxiliary losses: one forward,
        one backward for what the projection sees, one for the projected auxiliary
        gradient alone (the metrics need it apart) and one for what bypasses it."""
        if not auxiliary:
            return plain_branch(trainable, frozen)
        projected = jnp.array([a.weight if a.projected else 0.0 for a in auxiliary])
        bypass = jnp.array([0.0 if a.projected else a.weight for a in auxiliary])

        def fn(branch, draws):
            def objective(t):
                loss, outputs = forward(t, frozen, branch, draws)
                params = scope.merge(t, frozen)
                own = draws.get("auxiliary", {})
                values = [a.fn(params, branch, outputs, own.get(a.name, {})) for a in auxiliary]
                return loss, jnp.stack(values)

            (loss, aux_losses), vjp = jax.vjp(objective, trainable)
            losses = {"loss": loss, **{a.name: aux_losses[i] for i, a in enumerate(auxiliary)}}
            zero = jnp.zeros_like(loss)
            grads = {"grad": constrain(vjp((jnp.ones_like(loss), projected))[0])}
            if any_projected:
                grads["projected_aux"] = constrain(vjp((zero, projected))[0])
            if any_bypass:
                grads["unprojected"] = constrain(vjp((zero, bypass))[0])
            return losses, grads

        return fn

    def positive_draws(branch, post_rng, noise_rng):
        out = draws_fn(branch, post_rng, noise_rng)
        own = {}
        for i, a in enumerate(auxiliary):
            if a.draws is not None:
                # Keys of their own: the diffusion draws stay those of a run without them.
                key = jax.random.fold_in(noise_rng, 1000 + i)
                own[a.name] = a.draws(_latent_shape_nchw(model, branch), key)
        if own:
            out["auxiliary"] = own
        return out

    def auxiliary_metrics(pos):
        """Norms of the diffusion and the (weighted) auxiliary gradients and their cosine."""
        parts = [pos[k] for k in ("projected_aux", "unprojected") if k in pos]
        g_aux = parts[0] if len(parts) == 1 else jax.tree.map(jnp.add, *parts)
        g_diff = pos["grad"]
        if "projected_aux" in pos:
            g_diff = jax.tree.map(jnp.subtract, g_diff, pos["projected_aux"])
        dd, aa = projection.tree_dot(g_diff, g_diff), projection.tree_dot(g_aux, g_aux)
        da = projection.tree_dot(g_diff, g_aux)
        nonzero = (dd > 0) & (aa > 0)
        cosine = jnp.where(
            nonzero,
            da / (jnp.sqrt(jnp.where(nonzero, dd, 1.0)) * jnp.sqrt(jnp.where(nonzero, aa, 1.0))),
            0.0,
        )
        return {
            "grad_norm_diffusion": jnp.sqrt(dd),
            "grad_norm_aux": jnp.sqrt(aa),
            "cosine_aux": cosine,
        }

    def gradients(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[Grads, Metrics]:
        pos_post, pos_noise, neg_post, neg_noise = jax.random.split(rng, 4)
        if train_config.share_noise:
            neg_noise = pos_noise
        positive = batch["positive"]
        losses, pos = accumulate(
            positive_branch(state.trainable, state.frozen),
            grad_accum,
            positive,
            positive_draws(positive, pos_post, pos_noise),
        )
        grads = {"positive": pos["grad"]}
        if "unprojected" in pos:
            grads["unprojected"] = pos["unprojected"]
        metrics = {"loss_pos": losses.pop("loss")}
        metrics.update({f"loss_{name}": v for name, v in losses.items()})
        if auxiliary:
            metrics.update(auxiliary_metrics(pos))
        if nsync:
            negative = batch["negative"]

            def fresh(_):
                neg_losses, neg = accumulate(
                    plain_branch(state.trainable, state.frozen),
                    grad_accum,
                    negative,
                    draws_fn(negative, neg_post, neg_noise),
                )
                return {"grad": neg["grad"], "loss": neg_losses["loss"].astype(jnp.float32)}

            if negative_every == 1:
                computed = fresh(None)
            else:
                if state.negative is None:
                    raise ValueError("negative_every > 1 needs init_state(carry_negative=True)")
                computed = jax.lax.cond(
                    state.step % negative_every == 0, fresh, lambda _: state.negative, None
                )
            grads["negative"] = computed["grad"]
            metrics["loss_neg"] = computed["loss"]
        return grads, metrics

    return gradients


# --- apply -------------------------------------------------------------------------------------


def make_apply(tx: optax.GradientTransformationExtraArgs, nsync: bool, ema_decay: float = 0.0):
    """`apply(state, grads, metrics) -> (state, metrics)`: one optimizer update.

    In nsync mode `tx.update` gets g− as `negative_updates=` (the projection comes first
    in `tx`) and an unprojected auxiliary gradient as `unprojected_updates=`, which the
    projection adds after projecting. Adds the norms, the projection's cosine and
    coefficient to `metrics`, records the first non-finite step, and carries g− when the
    state has a slot for it. With `ema_decay` > 0 the state's EMA (made by
    `init_state(..., ema=True)`) moves toward the updated parameters by `ema_decay_at`.
    It lives in the step, not in a hook: updated in place in the donated state, it costs
    no extra copy of the parameters and no extra dispatch.
    """
    if not 0 <= ema_decay < 1:
        raise ValueError(f"train.ema_decay must be in [0, 1), got {ema_decay}")

    def apply(state: TrainState, grads: Grads, metrics: Metrics) -> tuple[TrainState, Metrics]:
        if (state.ema is None) != (ema_decay == 0):
            raise ValueError(
                f"ema_decay={ema_decay} but the state has {'no' if state.ema is None else 'an'} "
                "EMA: make it with init_state(..., ema=ema_decay > 0)"
            )
        g_pos = grads["positive"]
        metrics = dict(metrics, grad_norm_pos=optax.tree.norm(g_pos))
        extra = {}
        negative = state.negative
        if nsync:
            extra["negative_updates"] = grads["negative"]
            metrics["grad_norm_neg"] = optax.tree.norm(grads["negative"])
            if "unprojected" in grads:
                extra["unprojected_updates"] = grads["unprojected"]
            if state.negative is not None:
                negative = {"grad": grads["negative"], "loss": metrics["loss_neg"]}
        elif "unprojected" in grads:
            g_pos = jax.tree.map(jnp.add, g_pos, grads["unprojected"])
        updates, opt_state = tx.update(g_pos, state.opt_state, state.trainable, **extra)
        trainable = optax.apply_updates(state.trainable, updates)
        ema = state.ema
        if ema_decay > 0:
            ema = ema_update(ema, trainable, ema_decay_at(ema_decay, state.step))
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
            ema=ema,
        )
        return new_state, metrics

    return apply


def make_train_step(
    model: models.StableDiffusion,
    scope: Scope,
    tx: optax.GradientTransformationExtraArgs,
    train_config: ml_collections.ConfigDict,
    trainable_shardings: Any = None,
    negative_every: int = 1,
    grad_accum: int = 1,
    auxiliary: tuple[AuxiliaryLoss, ...] = (),
    ema_decay: float = 0.0,
):
    """The pure step `(state, batch) -> (state, metrics)`: `gradients` then `apply`.

    Arguments as `make_gradients`; `tx` is the optimizer (in nsync mode it takes
    `negative_updates=`); `ema_decay` as `make_apply`.
    """
    gradients = make_gradients(
        model,
        scope,
        train_config,
        trainable_shardings=trainable_shardings,
        negative_every=negative_every,
        grad_accum=grad_accum,
        auxiliary=auxiliary,
    )
    apply = make_apply(tx, nsync=train_config.mode == "nsync", ema_decay=ema_decay)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        grads, metrics = gradients(state, batch, state.step_key())
        return apply(state, grads, metrics)

    return step
