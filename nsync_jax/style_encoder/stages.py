"""Each stage's state and pure step `(state, batch) -> (state, metrics)`.

The state is `step.TrainState` in every stage (step, RNG, trainable, frozen, optimizer
state, the first non-finite step), so checkpoints, the loop and its hooks are the
trainer's own. What trains and what is frozen:

| stage | trainable | frozen | loss |
|---|---|---|---|
| 1 | `{"bank": [N, n, D]}` | SD (UNet, VAE, text encoder) | ε-MSE, context = splice(bank[index]) |
| 2 | encoder (tower + projection) | `{"bank"}`: stage 1's vectors | MSE(encoder(x), bank[index]) |
| 3 | encoder (tower + projection) | SD | ε-MSE, context = splice(encoder(x)) |

Stage 1 is the per-image inversion. The loss of step k gathers the rows of the bank as
step k − 1 left them, inside the differentiated function: the public code stacks the
batch's vectors once, before its loop, so every step's loss (and the file it saves) is
that stale copy, the random initial values. Each row has its own AdamW state (the
optimizer is `vmap`ped over rows, counts included), and a step reads and writes only the
batch's rows of the bank and of that state: an image's vectors move only on its own
steps, as the public code's optimizer per batch of images does, and weight decay does not
shrink the other images' vectors in between.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from nsync_jax import diffusion, models
from nsync_jax import step as step_lib
from nsync_jax.style_encoder import encoder as encoder_lib
from nsync_jax.style_encoder import splice

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[[step_lib.TrainState, Batch], tuple[step_lib.TrainState, Metrics]]


def init_bank(rng: jax.Array, num_images: int, num_tokens: int, dim: int, std: float) -> Any:
    """Stage 1's trainable tree: `{"bank": N(0, std²) of [num_images, num_tokens, dim]}`."""
    return {"bank": std * jax.random.normal(rng, (num_images, num_tokens, dim), jnp.float32)}


def init_stage1_state(
    bank: Any, frozen: Any, tx: optax.GradientTransformation, rng: jax.Array
) -> step_lib.TrainState:
    """Stage 1's state before step 0: one optimizer state per bank row (its leaves lead
    with N, counts included)."""
    state = step_lib.init_state(bank, frozen, optax.identity(), rng)
    return state.replace(opt_state=jax.vmap(tx.init)(bank["bank"]))


def make_diffusion_loss(model: models.StableDiffusion) -> Callable[..., jax.Array]:
    """`loss(sd_params, pixels, context, rng)`: the ε/v MSE of the frozen UNet on the
    batch's latents (a VAE posterior sample, scaled) at uniform timesteps, given the
    UNet's `context` [B, L, D]."""
    schedule = diffusion.make_schedule(model.scheduler_config)

    def loss(sd_params, pixels, context, rng):
        posterior_rng, noise_rng = jax.random.split(rng)
        latents = model.encode_images(sd_params["vae"], pixels, posterior_rng)
        latents = jax.lax.stop_gradient(latents)
        noise, timesteps = diffusion.sample_noise(schedule, noise_rng, latents.shape)
        noised = diffusion.add_noise(schedule, latents, noise, timesteps)
        prediction = model.predict_noise(sd_params["unet"], noised.noisy, timesteps, context)
        return diffusion.mse(prediction, noised.target)

    return loss


def _record_nonfinite(state: step_lib.TrainState, metrics: Metrics) -> jax.Array:
    finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in metrics.values()]))
    return jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step)


def make_stage1_step(
    model: models.StableDiffusion, tx: optax.GradientTransformation, placeholder_id: int
) -> StepFn:
    """Stage 1: the batch's rows of the bank, as the previous step left them, through the
    splice and the frozen UNet; AdamW per row; only the batch's rows are written back.

    A batch's `index` must not repeat a row (`data.StyleBatches` serves distinct rows).
    """
    diffusion_loss = make_diffusion_loss(model)

    def step(state, batch):
        index = batch["index"]
        bank = state.trainable["bank"]

        def loss_fn(rows):
            context = splice.encode_spliced(
                model, state.frozen["text_encoder"], batch["input_ids"], rows, placeholder_id
            )
            return diffusion_loss(state.frozen, batch["pixels"], context, state.step_key())

        rows = bank[index]  # Gathered from the current bank, never from a copy.
        loss, grads = jax.value_and_grad(loss_fn)(rows)
        row_states = jax.tree.map(lambda x: x[index], state.opt_state)
        updates, row_states = jax.vmap(tx.update)(grads, row_states, rows)
        rows = optax.apply_updates(rows, updates)
        opt_state = jax.tree.map(lambda x, r: x.at[index].set(r), state.opt_state, row_states)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "update_norm": optax.tree.norm(updates),
        }
        return (
            state.replace(
                step=state.step + 1,
                trainable={"bank": bank.at[index].set(rows)},
                opt_state=opt_state,
                nonfinite_step=_record_nonfinite(state, metrics),
            ),
            metrics,
        )

    return step


def _encoder_tokens(encoder: encoder_lib.StyleEncoder, params: Any, pixels: jax.Array):
    inputs = encoder_lib.tower_inputs(pixels, encoder.vision_config.image_size)
    return encoder.apply({"params": params}, inputs)


def _with_update(
    apply: Callable[..., Any], state: step_lib.TrainState, loss: jax.Array, grads: Any
) -> tuple[step_lib.TrainState, Metrics]:
    state, metrics = apply(state, {"positive": grads}, {"loss": loss})
    metrics["grad_norm"] = metrics.pop("grad_norm_pos")
    return state, metrics


def make_stage2_step(encoder: encoder_lib.StyleEncoder, tx: optax.GradientTransformation) -> StepFn:
    """Stage 2: MSE between the encoder's tokens and the batch's stage-1 vectors."""
    apply = step_lib.make_apply(tx, nsync=False)

    def step(state, batch):
        targets = state.frozen["bank"][batch["index"]]

        def loss_fn(params):
            tokens = _encoder_tokens(encoder, params, batch["pixels"])
            return jnp.mean(jnp.square(tokens.astype(jnp.float32) - targets))

        loss, grads = jax.value_and_grad(loss_fn)(state.trainable)
        return _with_update(apply, state, loss, grads)

    return step


def make_stage3_step(
    model: models.StableDiffusion,
    encoder: encoder_lib.StyleEncoder,
    tx: optax.GradientTransformation,
    placeholder_id: int,
) -> StepFn:
    """Stage 3: the encoder's tokens spliced into the prompt, through the frozen text
    transformer and the frozen UNet (VAE latents at the training resolution); the
    gradient is taken with respect to the encoder's parameters alone."""
    diffusion_loss = make_diffusion_loss(model)
    apply = step_lib.make_apply(tx, nsync=False)

    def step(state, batch):
        def loss_fn(params):
            tokens = _encoder_tokens(encoder, params, batch["pixels"])
            context = splice.encode_spliced(
                model, state.frozen["text_encoder"], batch["input_ids"], tokens, placeholder_id
            )
            return diffusion_loss(state.frozen, batch["pixels"], context, state.step_key())

        loss, grads = jax.value_and_grad(loss_fn)(state.trainable)
        return _with_update(apply, state, loss, grads)

    return step
