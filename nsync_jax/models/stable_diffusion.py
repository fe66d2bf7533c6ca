"""Stable Diffusion as the trainer and the samplers see it: our UNet, VAE and CLIP text
encoder (`unet.py`, `vae.py`, `clip.py`), the tokenizer and the noise-schedule config.

`build_tiny(config.model, rng)` returns a `StableDiffusion` (the modules, tokenizer,
noise-schedule config and the UNet's attention/remat options of `unet_memory.py`) and its
parameters as `{"unet": ..., "vae": ..., "text_encoder": ...}`: small random models from
config, for tests and the demo. A pretrained diffusers folder or hub id is loaded into
these modules by `weights.py` (`export.py` writes one back for PyTorch); `runs.build_model`
picks between the two by `model.source`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from transformers import CLIPTokenizer

from nsync_jax import errors, unet_memory
from nsync_jax.models import clip
from nsync_jax.models import unet as unet_lib
from nsync_jax.models import vae as vae_lib

Params = dict[str, Any]


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def side_multiple(unet: unet_lib.UNet2DConditionModel, vae: vae_lib.AutoencoderKL) -> int:
    """What every image side must be a multiple of: the product of the VAE's and the UNet's
    halvings (see `check_resolution`); 64 for SD 1.x and 2.x."""
    return 2 ** (len(vae.config.block_out_channels) - 1 + len(unet.config.down_block_types) - 1)


def check_resolution(
    resolution: int, unet: unet_lib.UNet2DConditionModel, vae: vae_lib.AutoencoderKL
) -> None:
    """Raises unless the model can take images of side `resolution`.

    Every VAE block but the last halves the side, and so does every UNet down block but
    the last (each has a downsampler); the UNet's up path doubles it back and joins the
    skip connections, which fails deep inside the UNet ("Cannot concatenate arrays") when
    a halving was rounded. So the side must be a multiple of the product of the halvings.

    Raises:
      errors.ConfigError: naming `model.resolution`, the multiple and the nearest values.
    """
    vae_halvings = len(vae.config.block_out_channels) - 1
    unet_halvings = len(unet.config.down_block_types) - 1
    multiple = side_multiple(unet, vae)
    if resolution > 0 and resolution % multiple == 0:
        return
    below = resolution // multiple * multiple
    nearest = [str(side) for side in (below, below + multiple) if side > 0]
    raise errors.ConfigError(
        f"model.resolution={resolution} is not a multiple of {multiple} (the VAE downsamples "
        f"by {2**vae_halvings}, the UNet by {2**unet_halvings}): nearest valid "
        f"{' or '.join(nearest)}"
    )


def dtype_from_name(name: str) -> jnp.dtype:
    if name not in DTYPES:
        raise errors.ConfigError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def cast_floating(tree: Any, dtype: jnp.dtype) -> Any:
    """Casts floating leaves to `dtype`."""

    def cast(x):
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            return jnp.asarray(x, dtype)
        return x

    return jax.tree.map(cast, tree)


@dataclasses.dataclass(frozen=True)
class StableDiffusion:
    """The Stable Diffusion parts a trainer and a sampler need; parameters live apart."""

    unet: unet_lib.UNet2DConditionModel
    vae: vae_lib.AutoencoderKL
    text_encoder: clip.CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    resolution: int
    # Latents are the pixels (RGB + a zero channel) and the VAE is unused: a pixel-space
    # model for benchmarks where no trained autoencoder exists (`model.tiny.identity_vae`).
    identity_vae: bool = False
    # The UNet's attention kernel and remat (`model.attention`, `model.remat`, ...).
    memory: unet_memory.MemoryOptions = unet_memory.MemoryOptions()

    def __post_init__(self):
        # The UNet's fields carry the options; `full` remat wraps the call: both must agree.
        built = {k: getattr(self.unet, k) for k in ("attention", "remat", "remat_policy")}
        if built != self.memory.unet_attributes():
            raise ValueError(
                f"the UNet was built with {built}, but model.attention/remat ask for "
                f"{self.memory.unet_attributes()}: build it with `memory.unet_attributes()`"
            )

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the UNet's input."""
        side = self.resolution // self.vae_scale_factor
        return (self.unet.config.in_channels, side, side)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def tokenize(self, texts: list[str]) -> Any:
        """Token ids padded to the tokenizer's max length, as SD trains and samples."""
        return self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="np",
        ).input_ids

    def encode_text(self, text_params: Params, input_ids: jax.Array) -> jax.Array:
        """The UNet's context: the text encoder's last hidden state [B, L, D]."""
        return self.text_encoder.apply({"params": text_params}, input_ids).last_hidden_state

    def scale_latents(self, latents: jax.Array) -> jax.Array:
        """VAE latents to the UNet's scale: (z − shift_factor) · scaling_factor."""
        return vae_lib.scale_latents(latents, self.vae.config)

    def unscale_latents(self, latents: jax.Array) -> jax.Array:
        """The inverse of `scale_latents`."""
        return vae_lib.unscale_latents(latents, self.vae.config)

    def posterior_moments(
        self, vae_params: Params, pixels: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """(mean, std) of the VAE posterior of NCHW `pixels`, NHWC and unscaled: the layout
        latent caches store, and the one the posterior noise is drawn in."""
        posterior = self.vae.apply({"params": vae_params}, pixels, method=self.vae.encode)
        return jnp.transpose(posterior.mean, (0, 2, 3, 1)), jnp.transpose(
            posterior.std, (0, 2, 3, 1)
        )

    def latents_from_moments(self, mean: jax.Array, std: jax.Array, eps: jax.Array) -> jax.Array:
        """Scaled NCHW latents `mean + std·ε` from NHWC moments and noise."""
        return self.scale_latents(jnp.transpose(mean + std * eps, (0, 3, 1, 2)))

    def encode_images(self, vae_params: Params, pixels: jax.Array, rng: jax.Array) -> jax.Array:
        """Scaled VAE posterior sample, NCHW, from NCHW pixels in [-1, 1]."""
        if self.identity_vae:
            return jnp.concatenate([pixels, jnp.zeros_like(pixels[:, :1])], axis=1)
        mean, std = self.posterior_moments(vae_params, pixels)
        return self.latents_from_moments(mean, std, jax.random.normal(rng, mean.shape))

    def decode_latents(self, vae_params: Params, latents: jax.Array) -> jax.Array:
        """NCHW pixels in [-1, 1] from scaled NCHW latents."""
        if self.identity_vae:
            return latents[:, :3]
        return self.vae.apply(
            {"params": vae_params}, self.unscale_latents(latents), method=self.vae.decode
        )

    def predict_noise(
        self, unet_params: Params, latents: jax.Array, timesteps: jax.Array, context: jax.Array
    ) -> jax.Array:
        """The UNet's output, NCHW, with the model's attention kernel and remat."""
        return self.memory.apply_unet(self.unet, unet_params, latents, timesteps, context)


# Whole words of the tiny tokenizer; everything else falls back to byte-level pieces.
TINY_WORDS = (
    "a an the of in on with and style painting illustration photo picture drawing "
    "digit handwritten red green blue yellow white black orange purple circle square "
    "triangle cross ring dot big small background zero one two three four five six "
    "seven eight nine"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, others shift up.
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word as CLIP's tokenizer applies it: best-ranked pair first."""
    while len(pieces) > 1:
        rank, i = min(
            (ranks.get(pair, math.inf), i)
            for i, pair in enumerate(zip(pieces[:-1], pieces[1:], strict=True))
        )
        if rank == math.inf:
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def write_tiny_tokenizer(
    directory: str, max_length: int, words=TINY_WORDS, vocab_size: int | None = None
) -> str:
    """Writes a CLIP BPE tokenizer (vocab.json, merges.txt) that knows `words` whole.

    With `vocab_size`, the vocabulary is padded with unused entries to exactly that size
    (the embedding table of a published text encoder; BPE never produces them).

    Merges join each word left to right; where an earlier word's merge gets in the way
    (`the` and `red` split `three` into `th`, `re`, `e`), the pieces BPE actually reaches
    are joined by merges appended after, until every listed word is one token. Any other
    text splits into byte-level pieces. Real runs load SD's own tokenizer files.
    """
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []

    def add(a: str, b: str) -> None:
        if (a, b) not in merges:
            merges.append((a, b))
        if a + b not in vocab:  # `thre` may already be a prefix token of `three`.
            vocab.append(a + b)

    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for k in range(1, len(pieces)):
            add("".join(pieces[:k]), pieces[k])
    for _ in range(len(words)):  # Each pass makes at least one more word whole.
        ranks = {pair: rank for rank, pair in enumerate(merges)}
        split = [_bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks) for w in words]
        split = [p for p in split if len(p) > 1]
        if not split:
            break
        for pieces in split:
            add(pieces[0], pieces[1])
    else:
        raise RuntimeError("tiny tokenizer merges did not converge")
    if vocab_size is not None:
        if vocab_size < len(vocab) + 2:
            raise ValueError(f"vocab_size {vocab_size} < the {len(vocab) + 2} tokens needed")
        vocab += [f"<unused{i}>" for i in range(vocab_size - len(vocab) - 2)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"}, f)
    return directory


# The tiny models' GroupNorm groups (the published models' value): channels are multiples.
TINY_NORM_GROUPS = 32


def _tiny_scheduler_config(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    return {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": cfg.prediction_type,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


def build(
    model_config: ml_collections.ConfigDict,
    unet_config: unet_lib.UNetConfig,
    vae_config: vae_lib.VAEConfig,
    text_config: clip.CLIPTextConfig,
    tokenizer: CLIPTokenizer,
    scheduler_config: dict[str, Any],
    identity_vae: bool = False,
) -> StableDiffusion:
    """The modules of these configs with the `model` group's dtype and memory options."""
    compute_dtype = dtype_from_name(model_config.compute_dtype)
    memory = unet_memory.MemoryOptions.from_config(model_config)
    unet = unet_lib.UNet2DConditionModel(
        unet_config, dtype=compute_dtype, **memory.unet_attributes()
    )
    vae = vae_lib.AutoencoderKL(vae_config, dtype=compute_dtype)
    check_resolution(model_config.resolution, unet, vae)
    return StableDiffusion(
        unet=unet,
        vae=vae,
        text_encoder=clip.CLIPTextModel(text_config, dtype=compute_dtype),
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        resolution=model_config.resolution,
        identity_vae=identity_vae,
        memory=memory,
    )


def init_params(model: StableDiffusion, rng: jax.Array) -> Params:
    """Random parameters of every component (float32, plain dicts)."""
    unet_rng, vae_rng, text_rng = jax.random.split(rng, 3)
    max_length = model.text_encoder.config.max_position_embeddings
    return {
        "unet": model.unet.init_weights(unet_rng),
        "vae": model.vae.init_weights(vae_rng),
        "text_encoder": model.text_encoder.init_weights(text_rng, (1, max_length)),
    }


def build_tiny(
    model_config: ml_collections.ConfigDict, rng: jax.Array, tokenizer_dir: str | None = None
) -> tuple[StableDiffusion, Params]:
    """Random-init tiny Stable Diffusion of the real structure, from `model_config.tiny`.

    Raises:
      errors.ConfigError: a channel count, `identity_vae` or `model.resolution` the
        modules cannot take, or an unknown attention/remat option (checked before any
        parameter is initialised).
    """
    cfg = model_config.tiny
    for channels in (*cfg.unet_channels, *cfg.vae_channels):
        if channels % TINY_NORM_GROUPS:
            raise errors.ConfigError(
                f"model.tiny channel count {channels} is not a multiple of "
                f"{TINY_NORM_GROUPS} (the tiny UNet and VAE use GroupNorm({TINY_NORM_GROUPS}))"
            )
    if cfg.identity_vae and len(cfg.vae_channels) != 1:
        raise errors.ConfigError(
            f"model.tiny.identity_vae needs one VAE block (latents at pixel size), got "
            f"vae_channels={tuple(cfg.vae_channels)}"
        )
    tokenizer_dir = tokenizer_dir or tempfile.mkdtemp(prefix="nsync-tokenizer-")
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tokenizer_dir, cfg.max_length))
    n_down = len(cfg.unet_channels)
    unet_config = unet_lib.UNetConfig(
        sample_size=model_config.resolution // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n_down - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_down - 1),
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        cross_attention_dim=cfg.text_hidden,
        norm_num_groups=TINY_NORM_GROUPS,
    )
    vae_config = vae_lib.VAEConfig(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=TINY_NORM_GROUPS,
        sample_size=model_config.resolution,
    )
    text_config = clip.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = build(
        model_config,
        unet_config,
        vae_config,
        text_config,
        tokenizer,
        _tiny_scheduler_config(cfg),
        identity_vae=cfg.identity_vae,
    )
    # Jitted: eager init compiles op by op and takes several times longer.
    params = jax.jit(functools.partial(init_params, model))(rng)
    return model, cast_floating(params, dtype_from_name(model_config.param_dtype))


def build_random(
    model_config: ml_collections.ConfigDict, rng: jax.Array, abstract: bool = False
) -> tuple[StableDiffusion, Params]:
    """A published architecture (`model.architecture`: `sd15`, `sd2_base`, `tiny`;
    `architectures.py`) with random weights, nothing downloaded: for memory reports and
    throughput benchmarks at real size.

    The tokenizer is the tiny one padded to the text encoder's vocabulary size, so token
    scopes add their row exactly as on the real model.

    Args:
      model_config: `config.model` (`architecture`, `resolution`, dtypes).
      rng: the init key.
      abstract: return `jax.ShapeDtypeStruct`s instead of initialised arrays (no memory,
        no compute: what an ahead-of-time compile needs).
    """
    from nsync_jax import architectures  # Plain dicts.

    arch = model_config.architecture
    if arch not in architectures.ARCHS:
        raise errors.ConfigError(
            f"model.architecture={arch!r} is not one of {sorted(architectures.ARCHS)}"
        )
    text_cfg = architectures.text_config(arch)
    tokenizer_dir = tempfile.mkdtemp(prefix="nsync-tokenizer-")
    tokenizer = CLIPTokenizer.from_pretrained(
        write_tiny_tokenizer(
            tokenizer_dir, text_cfg["max_position_embeddings"], vocab_size=text_cfg["vocab_size"]
        )
    )
    unet_cfg = architectures.unet_config(arch)
    vae_cfg = architectures.vae_config(arch)
    unet_cfg["sample_size"] = (
        model_config.resolution // architectures.ARCHS[arch]["vae_scale_factor"]
    )
    vae_cfg["sample_size"] = model_config.resolution
    text_cfg.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = build(
        model_config,
        unet_lib.UNetConfig.from_dict(unet_cfg),
        vae_lib.VAEConfig.from_dict(vae_cfg),
        clip.CLIPTextConfig.from_dict(text_cfg),
        tokenizer,
        architectures.scheduler_config(arch),
    )
    param_dtype = dtype_from_name(model_config.param_dtype)

    def init_cast(rng):
        return cast_floating(init_params(model, rng), param_dtype)

    params = jax.eval_shape(init_cast, rng) if abstract else jax.jit(init_cast)(rng)
    return model, params
