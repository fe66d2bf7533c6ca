"""The Stable Diffusion autoencoder (`AutoencoderKL`, Kingma & Welling 2014; Rombach et al.
2022, https://arxiv.org/abs/2112.10752) as a Flax linen module.

The network is diffusers' `AutoencoderKL` with `DownEncoderBlock2D` / `UpDecoderBlock2D`
blocks and SiLU, built from a diffusers `vae/config.json` (`VAEConfig`):

    encoder:  conv_in → down blocks → mid block → GroupNorm, SiLU, conv_out (2·latent) →
              quant_conv → (mean, logvar), logvar clamped to [-30, 20]
    decoder:  post_quant_conv → conv_in → mid block → up blocks → GroupNorm, SiLU, conv_out

A down block is `layers_per_block` ResNet blocks then (all but the last block) a stride-2
3x3 convolution after padding one row and column at the bottom and right; an up block is
`layers_per_block + 1` ResNet blocks then (all but the last) a nearest-neighbour 2x
upsampling and a 3x3 convolution. The mid block is ResNet, single-head self-attention over
the H·W positions (optional: `mid_block_add_attention`), ResNet. A ResNet block is
`x + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))`, with a 1x1 `conv_shortcut` on x where the
width changes. Every GroupNorm has `norm_num_groups` groups and ε = 1e-6, and is computed
in float32 whatever the model's dtype.

Parameter names are those of diffusers' former Flax VAE (`down_blocks_0/resnets_1/conv1`,
mid-block attention `query`/`key`/`value`/`proj_attn`/`group_norm`), so `weights.torch_key`
maps each to its PyTorch key and checkpoints of the former classes still load.

Inputs and outputs are NCHW, as in PyTorch; inside, the layers run NHWC.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from nsync_jax import errors
from nsync_jax.models import layers

Dtype = Any

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
RESNET_EPS = 1e-6  # diffusers' VAE blocks use 1e-6, not the config's (absent) norm_eps.
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar here.


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers `AutoencoderKL` config; defaults are diffusers' own, since
    a `config.json` lists only what its writer knew (older ones lack `scaling_factor`).

    Attributes:
      in_channels: image channels read by the encoder.
      out_channels: image channels written by the decoder.
      down_block_types: one `"DownEncoderBlock2D"` per resolution level.
      up_block_types: one `"UpDecoderBlock2D"` per resolution level.
      block_out_channels: the width of each level, highest resolution first.
      layers_per_block: ResNet blocks per down block (up blocks have one more).
      latent_channels: channels of the latents.
      norm_num_groups: groups of every GroupNorm.
      act_fn: the activation; only "silu".
      sample_size: the image side the model was trained at (informational).
      scaling_factor: latents are `(z - shift_factor) · scaling_factor` for the UNet.
      shift_factor: see `scaling_factor`; None means 0.
      use_quant_conv: whether the 1x1 `quant_conv` follows the encoder.
      use_post_quant_conv: whether the 1x1 `post_quant_conv` precedes the decoder.
      mid_block_add_attention: whether the mid blocks hold self-attention.
      force_upcast: diffusers runs this VAE in float32 under fp16 pipelines; kept for the
        round trip, not used here (the dtype is the caller's choice).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True

    def __post_init__(self):
        # JSON gives lists; a frozen config (a Flax module attribute) must hash.
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        levels = len(self.block_out_channels)
        if levels < 1:
            self._reject("block_out_channels", "at least one level")
        for name, block in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            types = getattr(self, name)
            if any(t != block for t in types):
                self._reject(name, f"only {block!r} blocks")
            if len(types) != levels:
                self._reject(name, f"one block per block_out_channels entry ({levels})")
        if self.act_fn != "silu":
            self._reject("act_fn", "only 'silu'")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            self._reject("norm_num_groups", "a divisor of every block_out_channels entry")
        if self.layers_per_block < 1:
            self._reject("layers_per_block", ">= 1")
        shift = self.shift_factor
        if shift is not None and not isinstance(shift, numbers.Real):
            self._reject("shift_factor", "None or a number")

    def _reject(self, field: str, expected: str):
        raise errors.ConfigError(
            f"VAE config: {field}={getattr(self, field)!r} is not supported ({expected})"
        )

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> VAEConfig:
        """The config of a diffusers `vae/config.json` dict (`_`-prefixed keys ignored).

        Raises:
          errors.ConfigError: a value this module does not implement, or an unknown key,
            naming the field.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in ("latents_mean", "latents_std"):
                # Per-channel latent statistics that replace scaling_factor in some
                # pipelines; `scale_latents` does not apply them, so they must be unset.
                if value is not None:
                    raise errors.ConfigError(
                        f"VAE config: {key}={value!r} is not supported (only None)"
                    )
                continue
            if key not in fields:
                raise errors.ConfigError(f"VAE config: unknown field {key!r}")
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The config as diffusers' `AutoencoderKL.from_config` reads it."""
        config = {"_class_name": "AutoencoderKL"}
        for name, value in dataclasses.asdict(self).items():
            config[name] = list(value) if isinstance(value, tuple) else value
        return config

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side: 2^(levels − 1)."""
        return 2 ** (len(self.block_out_channels) - 1)


def scale_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
    """The UNet's latents from the VAE's: `(z − shift_factor) · scaling_factor`."""
    shift = config.shift_factor or 0.0
    return (latents - shift) * config.scaling_factor


def unscale_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
    """The VAE's latents from the UNet's: the inverse of `scale_latents`."""
    shift = config.shift_factor or 0.0
    return latents / config.scaling_factor + shift


class DiagonalGaussian(NamedTuple):
    """The encoder's posterior N(mean, exp(logvar)), NCHW; `logvar` is already clamped."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """`mean + std · ε`, ε ~ N(0, I) drawn from `rng` in `mean`'s shape."""
        eps = jax.random.normal(rng, self.mean.shape, jnp.float32)
        return (self.mean + self.std * eps).astype(self.mean.dtype)


# ---------------------------------------------------------------------------------------
# Blocks (NHWC).


def _group_norm(x: jax.Array, groups: int, name: str) -> jax.Array:
    """GroupNorm named `name` in the calling module, in float32, back in x's dtype.

    Two-pass variance (`use_fast_variance=False`), as PyTorch computes it: E[x²] − E[x]²
    loses digits where activations have a large mean.
    """
    norm = nn.GroupNorm(
        num_groups=groups,
        epsilon=RESNET_EPS,
        dtype=jnp.float32,
        use_fast_variance=False,
        name=name,
    )
    return norm(x.astype(jnp.float32)).astype(x.dtype)


class ResnetBlock(nn.Module):
    """`x + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))`, 1x1 `conv_shortcut` on a width change."""

    features: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(_group_norm(x, self.groups, "norm1"))
        h = layers.Conv(self.features, dtype=self.dtype, name="conv1")(h)
        h = nn.silu(_group_norm(h, self.groups, "norm2"))
        h = layers.Conv(self.features, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.features:
            x = layers.Conv(
                self.features, (1, 1), padding="VALID", dtype=self.dtype, name="conv_shortcut"
            )(x)
        return x.astype(self.dtype) + h


class Downsample(nn.Module):
    """A stride-2 3x3 convolution after zero-padding the bottom row and right column."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        conv = layers.Conv(
            self.features, strides=(2, 2), padding="VALID", dtype=self.dtype, name="conv"
        )
        return conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return layers.Conv(self.features, dtype=self.dtype, name="conv")(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H·W positions, with a GroupNorm before and the
    input added after (the VAE mid block's attention)."""

    groups: int
    attention: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = _group_norm(x, self.groups, "group_norm").reshape(batch, height * width, 1, channels)
        q, k, v = (
            layers.Dense(channels, dtype=self.dtype, name=name)(h)
            for name in ("query", "key", "value")
        )
        h = layers.attention(q, k, v, self.attention).reshape(batch, height * width, channels)
        h = layers.Dense(channels, dtype=self.dtype, name="proj_attn")(h)
        return x.astype(self.dtype) + h.reshape(batch, height, width, channels)


class MidBlock(nn.Module):
    """ResNet, self-attention (if `add_attention`), ResNet at the lowest resolution."""

    features: int
    groups: int
    add_attention: bool = True
    attention: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock(self.features, self.groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = AttentionBlock(self.groups, self.attention, self.dtype, name="attentions_0")(x)
        return ResnetBlock(self.features, self.groups, self.dtype, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
    """`num_layers` ResNet blocks, then a `Downsample` unless it is the last level."""

    features: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample(self.features, self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock(nn.Module):
    """`num_layers` ResNet blocks, then an `Upsample` unless it is the last level."""

    features: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample(self.features, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """NHWC pixels → NHWC moments (2·latent_channels: mean, then logvar)."""

    config: VAEConfig
    attention: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        widths = c.block_out_channels
        x = layers.Conv(widths[0], dtype=self.dtype, name="conv_in")(x)
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            x = DownEncoderBlock(
                width,
                c.layers_per_block,
                c.norm_num_groups,
                not last,
                self.dtype,
                name=f"down_blocks_{i}",
            )(x)
        x = MidBlock(
            widths[-1],
            c.norm_num_groups,
            c.mid_block_add_attention,
            self.attention,
            self.dtype,
            name="mid_block",
        )(x)
        x = nn.silu(_group_norm(x, c.norm_num_groups, "conv_norm_out"))
        return layers.Conv(2 * c.latent_channels, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """NHWC latents → NHWC pixels."""

    config: VAEConfig
    attention: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        c = self.config
        widths = tuple(reversed(c.block_out_channels))
        x = layers.Conv(widths[0], dtype=self.dtype, name="conv_in")(z)
        x = MidBlock(
            widths[0],
            c.norm_num_groups,
            c.mid_block_add_attention,
            self.attention,
            self.dtype,
            name="mid_block",
        )(x)
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            x = UpDecoderBlock(
                width,
                c.layers_per_block + 1,
                c.norm_num_groups,
                not last,
                self.dtype,
                name=f"up_blocks_{i}",
            )(x)
        x = nn.silu(_group_norm(x, c.norm_num_groups, "conv_norm_out"))
        return layers.Conv(c.out_channels, dtype=self.dtype, name="conv_out")(x)


# ---------------------------------------------------------------------------------------
# The model.


class AutoencoderKL(nn.Module):
    """The KL autoencoder (module docstring); NCHW in and out.

    Use a method through `apply`:

        posterior = vae.apply({"params": p}, pixels, method=vae.encode)
        pixels = vae.apply({"params": p}, latents, method=vae.decode)

    Attributes:
      config: the architecture.
      dtype: the computation dtype (GroupNorms run in float32).
      attention: the mid-block attention kernel, one of `layers.ATTENTIONS`.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    def setup(self):
        c = self.config
        self.encoder = Encoder(c, self.attention, self.dtype)
        self.decoder = Decoder(c, self.attention, self.dtype)
        if c.use_quant_conv:
            self.quant_conv = layers.Conv(
                2 * c.latent_channels, (1, 1), padding="VALID", dtype=self.dtype
            )
        if c.use_post_quant_conv:
            self.post_quant_conv = layers.Conv(
                c.latent_channels, (1, 1), padding="VALID", dtype=self.dtype
            )

    def encode(self, pixels: jax.Array) -> DiagonalGaussian:
        """The posterior of NCHW `pixels` (side a multiple of `config.downscale`)."""
        moments = self.encoder(jnp.transpose(pixels, (0, 2, 3, 1)))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = jnp.transpose(moments, (0, 3, 1, 2))
        mean, logvar = jnp.split(moments, 2, axis=1)
        return DiagonalGaussian(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    def decode(self, latents: jax.Array) -> jax.Array:
        """NCHW pixels of NCHW (unscaled) `latents`."""
        z = jnp.transpose(latents, (0, 2, 3, 1))
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return jnp.transpose(self.decoder(z), (0, 3, 1, 2))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """Reconstruction of `pixels` from the posterior mean (initialises every parameter)."""
        return self.decode(self.encode(pixels).mean)

    def init_weights(self, rng: jax.Array) -> dict[str, Any]:
        """Random parameters (convolutions do not depend on the image side, so the
        smallest side the levels divide is used)."""
        side = self.config.downscale
        pixels = jnp.zeros((1, self.config.in_channels, side, side), jnp.float32)
        return self.init(rng, pixels)["params"]
