"""Label-guided supervised contrastive training of several styles (`train.supcon_weight`).

A design after arXiv 2412.03957 (label-guided SupCon over two parameter-sharing branches,
for text-to-image GANs), brought to diffusion as ../shared/SUPCON.md describes: for each
positive example the model's clean-image estimate x̂0 (`diffusion.predict_x0`, from the
noisy input of the diffusion loss) is decoded by the frozen VAE and embedded by a frozen
image encoder; a second, parameter-sharing branch does the same for another view of the
same image, and `supcon.supcon` over the batch's [B, 2, D] embeddings, positives the
examples of the same style label (`data.styles`), is the auxiliary loss. Views
(`train.supcon_views`):

- `noise`: the second branch noises the same latents with its own noise and timestep;
- `captions`: the second branch denoises the same noisy latents under a second prompt
  (`train.supcon_view_template`), as the paper's predecessor pairs two captions.

The encoder (`train.supcon_encoder`) is the CLIP vision tower the evaluation loads
(`evaluation.clip_embed`, a Hugging Face CLIP folder) or `"tiny"`, a small random CLIP
ViT for tests and CPU runs. Its parameters join the frozen ones under `IMAGE_ENCODER`, so
they are sharded with them and never trained; they are not part of the run's model
(`model_part` is what checkpoints fingerprint). The loss enters the step as a
`step.AuxiliaryLoss`, added after the NSYNC projection unless `train.supcon_projected`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from nsync_jax import diffusion, errors, models, supcon
from nsync_jax import step as step_lib
from nsync_jax.evaluation import clip_embed, images
from nsync_jax.models import clip

IMAGE_ENCODER = "image_encoder"  # Key of the encoder's parameters in the frozen tree.
VIEWS = ("noise", "captions")
TINY_ENCODER = "tiny"
# The tiny encoder: a 2-layer CLIP ViT on 16 px inputs with a 32-wide head, random weights.
TINY_VISION = clip.CLIPVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=16,
    patch_size=4,
    projection_dim=32,
)


@dataclasses.dataclass(frozen=True)
class SupconSettings:
    """The `train.supcon_*` fields (configs/default.py), checked."""

    weight: float
    projected: bool
    temperature: float
    base_temperature: float
    encoder: str
    views: str
    view_template: str

    def __post_init__(self):
        if self.weight < 0:
            raise errors.ConfigError(f"train.supcon_weight must be >= 0, got {self.weight}")
        for name in ("temperature", "base_temperature"):
            if not getattr(self, name) > 0:
                raise errors.ConfigError(
                    f"train.supcon_{name} must be > 0, got {getattr(self, name)}"
                )
        if self.views not in VIEWS:
            raise errors.ConfigError(f"train.supcon_views={self.views!r} is not one of {VIEWS}")
        if self.weight > 0 and not self.encoder:
            raise errors.ConfigError(
                "train.supcon_weight > 0 needs train.supcon_encoder: a Hugging Face CLIP "
                "folder (e.g. eval.cmmd_weights) or 'tiny' (random weights, tests only)"
            )
        if self.weight > 0 and self.views == "captions" and "{caption}" not in self.view_template:
            raise errors.ConfigError(
                f"train.supcon_view_template {self.view_template!r} has no {{caption}}"
            )

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    @classmethod
    def from_config(cls, train_config: ml_collections.ConfigDict) -> SupconSettings:
        return cls(
            weight=train_config.supcon_weight,
            projected=train_config.supcon_projected,
            temperature=train_config.supcon_temperature,
            base_temperature=train_config.supcon_base_temperature,
            encoder=train_config.supcon_encoder,
            views=train_config.supcon_views,
            view_template=train_config.supcon_view_template,
        )


def load_encoder(settings: SupconSettings, seed: int) -> tuple[clip_embed.ClipImageEncoder, Any]:
    """The frozen image encoder and its parameters (`"tiny"`: random, from `seed`)."""
    if settings.encoder == TINY_ENCODER:
        encoder = clip_embed.ClipImageEncoder(TINY_VISION)
        return encoder, _lecun_kernels(clip_embed.init_params(encoder, jax.random.key(seed)))
    return clip_embed.load_hf(settings.encoder, metric="supcon")


def _lecun_kernels(params: Any) -> Any:
    """Kernels rescaled to std 1/√fan_in. Our CLIP draws them with std 0.01, as
    transformers' former Flax CLIP did (its weights are meant to be loaded), and at that
    scale the class token of a random tower barely sees the image: every embedding has
    cosine > 0.999 with every other one, and SupCon over them is flat (log(2B − 1)
    whatever the labels)."""

    def rescale(path, x):
        if path[-1].key != "kernel":
            return x
        fan_in = math.prod(x.shape[:-1])
        return x * (1.0 / math.sqrt(fan_in)) / jnp.maximum(jnp.std(x), 1e-12)

    return jax.tree.map_with_path(rescale, params)


def model_part(frozen: Any) -> Any:
    """The frozen tree without the encoder: what belongs to the run's model."""
    if isinstance(frozen, dict) and IMAGE_ENCODER in frozen:
        return {k: v for k, v in frozen.items() if k != IMAGE_ENCODER}
    return frozen


def embed(
    encoder: clip_embed.ClipImageEncoder, encoder_params: Any, pixels: jax.Array
) -> jax.Array:
    """L2-normalised embeddings [B, D] of NCHW pixels in [-1, 1], resized (bilinear) to
    the encoder's side and normalised as CLIP expects; differentiable in `pixels`."""
    size = encoder.config.image_size
    x = jnp.transpose(pixels.astype(jnp.float32), (0, 2, 3, 1)) * 0.5 + 0.5
    x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "bilinear")
    x = (x - images.CLIP_MEAN) / images.CLIP_STD
    return encoder.apply({"params": encoder_params}, x)


def make_auxiliary(
    settings: SupconSettings,
    model: models.StableDiffusion,
    encoder: clip_embed.ClipImageEncoder,
    options: diffusion.LossOptions = diffusion.PLAIN,
) -> step_lib.AuxiliaryLoss:
    """The SupCon term as a `step.AuxiliaryLoss` named `supcon` (metric `loss_supcon`).

    It reads the positive branch's `label` row (and `input_ids_view` for the `captions`
    views), the diffusion forward's noisy latents, timesteps and prediction, and the
    encoder's parameters under `params[IMAGE_ENCODER]`. `options` gives the second noise
    draw the diffusion loss's timestep range and noise offset.
    """
    schedule = diffusion.make_schedule(model.scheduler_config)

    def view_draws(shape, rng):
        noise, timesteps = diffusion.sample_noise(schedule, rng, shape, options)
        return {"noise": noise, "timesteps": timesteps}

    def x0_pixels(params, noisy, timesteps, prediction):
        x0 = diffusion.predict_x0(schedule, noisy, timesteps, prediction)
        return model.decode_latents(params["vae"], x0.astype(noisy.dtype))

    def loss(params, branch, outputs, draws):
        first = x0_pixels(params, outputs["noisy"], outputs["timesteps"], outputs["prediction"])
        if settings.views == "noise":
            noisy = diffusion.add_noise(
                schedule, outputs["latents"], draws["noise"], draws["timesteps"]
            ).noisy
            timesteps, context = draws["timesteps"], outputs["context"]
        else:
            noisy, timesteps = outputs["noisy"], outputs["timesteps"]
            context = model.encode_text(params["text_encoder"], branch["input_ids_view"])
        prediction = model.predict_noise(params["unet"], noisy, timesteps, context)
        second = x0_pixels(params, noisy, timesteps, prediction)
        encoder_params = params[IMAGE_ENCODER]
        features = jnp.stack(
            [embed(encoder, encoder_params, first), embed(encoder, encoder_params, second)],
            axis=1,
        )
        return supcon.supcon(
            features,
            branch["label"],
            temperature=settings.temperature,
            base_temperature=settings.base_temperature,
        )

    return step_lib.AuxiliaryLoss(
        "supcon",
        settings.weight,
        loss,
        projected=settings.projected,
        draws=view_draws if settings.views == "noise" else None,
    )
