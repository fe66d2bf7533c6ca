"""The Stable Diffusion UNet (`UNet2DConditionModel`) in Flax linen, built from a diffusers
`unet/config.json`.

The network is diffusers' PyTorch `UNet2DConditionModel` for the configs Stable Diffusion
1.x, 2.x and SDXL use: conv_in, a sinusoidal timestep embedding through two linears (plus,
for SDXL, `text_time` added conditioning), down blocks of ResNets with optional spatial
transformers, a cross-attention mid block, up blocks fed the down path's skips, and
GroupNorm-SiLU-conv_out. Inputs and outputs are NCHW like diffusers; inside it is NHWC.

Parameter names are the ones diffusers' Flax UNet used (`down_blocks_0/resnets_0/conv1/
kernel`), so `weights.torch_key` maps each to its PyTorch key and old checkpoints resume.

The config, and how its values are read (head counts above all), are `unet_config.py`'s;
`UNetConfig` is re-exported here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nsync_jax import errors
from nsync_jax.models import layers
from nsync_jax.models.unet_config import BlockSpec, UNetConfig

__all__ = ["BlockSpec", "UNetConfig", "UNet2DConditionModel", "timestep_embedding"]

Dtype = Any

REMATS = ("none", "blocks")
# The attention kernels that form Q·Kᵀ in the inputs' dtype, so `upcast_attention` casts
# q and k to fp32 for them. The others already keep scores in fp32 from bf16/fp16 inputs
# (`jax.nn.dot_product_attention`'s XLA path and cuDNN, splash's Pallas kernel), and need
# q, k and v of one dtype: upcasting would only cost them their fused kernels.
_SCORES_IN_INPUT_DTYPE = ("xla", "chunked")


# ---------------------------------------------------------------------------------------
# Layers.


def timestep_embedding(
    timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float
) -> jax.Array:
    """Sinusoidal embedding [N, dim] of N (possibly fractional) timesteps, in fp32.

    Frequencies are exp(-ln(10000) · i / (dim/2 - freq_shift)) for i < dim/2; the output is
    [sin, cos] of t · frequency ([cos, sin] with `flip_sin_to_cos`), zero-padded to `dim`.
    """
    half = dim // 2
    exponent = -math.log(10000) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    return jnp.pad(jnp.concatenate(parts, axis=-1), ((0, 0), (0, dim % 2)))


def _nearest_index(size_in: int, size_out: int) -> np.ndarray:
    """Source rows of PyTorch's 'nearest' resize: floor(i · in/out) with a float32 scale."""
    scale = np.float32(size_in) / np.float32(size_out)
    index = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int32)
    return np.minimum(index, size_in - 1)


def _resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    h, w = x.shape[1:3]
    if size == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x[:, _nearest_index(h, size[0])][:, :, _nearest_index(w, size[1])]


def _dense(module: Any, features: int, name: str, use_bias: bool = True) -> layers.Dense:
    """A `layers.Dense` in `module`'s compute dtype and LoRA scale."""
    return layers.Dense(
        features, use_bias=use_bias, dtype=module.dtype, lora_scale=module.lora_scale, name=name
    )


def _conv(
    module: Any, features: int, name: str, kernel: int = 3, stride: int = 1, padding: Any = 1
) -> layers.Conv:
    """A `layers.Conv`; an int `padding` pads every side by it."""
    pad = ((padding, padding),) * 2 if isinstance(padding, int) else padding
    return layers.Conv(
        features,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=pad,
        dtype=module.dtype,
        lora_scale=module.lora_scale,
        name=name,
    )


def _group_norm(module: Any, name: str, epsilon: float | None = None) -> nn.GroupNorm:
    """The config's GroupNorm: two-pass variance as PyTorch, statistics in fp32."""
    config = module.config
    return nn.GroupNorm(
        num_groups=config.norm_num_groups,
        epsilon=config.norm_eps if epsilon is None else epsilon,
        dtype=module.dtype,
        use_fast_variance=False,
        name=name,
    )


class _Part(nn.Module):
    """Fields every part of the UNet shares, and its layer factories."""

    config: UNetConfig
    dtype: Dtype
    attention: str
    lora_scale: float

    def shared(self) -> dict[str, Any]:
        return dict(
            config=self.config,
            dtype=self.dtype,
            attention=self.attention,
            lora_scale=self.lora_scale,
        )

    dense = _dense
    conv = _conv
    group_norm = _group_norm

    def layer_norm(self, name: str) -> nn.LayerNorm:
        # diffusers' UNet never passes its norm_eps to the transformer blocks: 1e-5 there.
        return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, use_fast_variance=False, name=name)


class TimestepEmbedding(_Part):
    """linear_1, SiLU, linear_2: the time (and SDXL's added-condition) embedding MLP."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.dense(self.features, "linear_1")(x)
        return self.dense(self.features, "linear_2")(nn.silu(x))


class ResnetBlock(_Part):
    """GroupNorm-SiLU-conv twice, the time embedding added in between, and the skip (1x1
    conv when the channels change); the sum divided by `output_scale_factor`."""

    out_channels: int
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        h = self.conv(self.out_channels, "conv1")(nn.silu(self.group_norm("norm1")(x)))
        h = h + self.dense(self.out_channels, "time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = self.conv(self.out_channels, "conv2")(nn.silu(self.group_norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = self.conv(self.out_channels, "conv_shortcut", kernel=1, padding=0)(x)
        return (x + h) / self.output_scale_factor


class Attention(_Part):
    """Multi-head attention: to_q/to_k/to_v without bias, to_out_0 with bias."""

    heads: int
    head_dim: int
    out_features: int

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        inner = self.heads * self.head_dim
        q = self.dense(inner, "to_q", use_bias=False)(x)
        k = self.dense(inner, "to_k", use_bias=False)(context)
        v = self.dense(inner, "to_v", use_bias=False)(context)
        q, k, v = (t.reshape(*t.shape[:2], self.heads, self.head_dim) for t in (q, k, v))
        if self.config.upcast_attention and self.attention in _SCORES_IN_INPUT_DTYPE:
            # SD 2.x's scores overflow fp16: form them from fp32 q and k (v stays, as the
            # softmax weights are cast to v's dtype, like diffusers' upcast processor).
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
        out = layers.attention(q, k, v, self.attention).astype(self.dtype)
        return self.dense(self.out_features, "to_out_0")(out.reshape(*out.shape[:2], inner))


class GEGLU(_Part):
    """proj to 2 · features, split into (h, gate): h · GELU(gate), GELU exact (erf)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.dense(2 * self.features, "proj")(x), 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(_Part):
    """GEGLU (`net_0`) to 4 · dim, then `net_2` back to dim."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(**self.shared(), features=4 * dim, name="net_0")(x)
        return self.dense(dim, "net_2")(h)


class TransformerBlock(_Part):
    """Pre-norm self-attention, cross-attention to the text, and a GEGLU feed-forward."""

    heads: int
    only_cross_attention: bool

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        attn = functools.partial(
            Attention,
            **self.shared(),
            heads=self.heads,
            head_dim=dim // self.heads,
            out_features=dim,
        )
        h = self.layer_norm("norm1")(x)
        x = x + attn(name="attn1")(h, context if self.only_cross_attention else None)
        x = x + attn(name="attn2")(self.layer_norm("norm2")(x), context)
        return x + FeedForward(**self.shared(), name="ff")(self.layer_norm("norm3")(x))


class SpatialTransformer(_Part):
    """diffusers' `Transformer2DModel` on continuous inputs: GroupNorm (eps 1e-6), proj_in
    (1x1 conv, or linear with `use_linear_projection`), transformer blocks over the H·W
    tokens, proj_out, plus the input."""

    heads: int
    num_layers: int
    only_cross_attention: bool

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        inner = self.heads * (channels // self.heads)
        linear = self.config.use_linear_projection
        project = (
            (lambda n, name: self.dense(n, name))
            if linear
            else (lambda n, name: self.conv(n, name, kernel=1, padding=0))
        )
        h = self.group_norm("norm", epsilon=1e-6)(x)
        h = project(inner, "proj_in")(h).reshape(batch, height * width, inner)
        for i in range(self.num_layers):
            h = TransformerBlock(
                **self.shared(),
                heads=self.heads,
                only_cross_attention=self.only_cross_attention,
                name=f"transformer_blocks_{i}",
            )(h, context)
        h = project(channels, "proj_out")(h.reshape(batch, height, width, inner))
        return h + x


# ---------------------------------------------------------------------------------------
# Blocks. Their calls take arrays only, so `nn.remat` needs no static arguments.


class _Block(_Part):
    spec: BlockSpec

    def resnet(self, i: int) -> ResnetBlock:
        return ResnetBlock(
            **self.shared(),
            out_channels=self.spec.out_channels,
            output_scale_factor=self.spec.output_scale_factor,
            name=f"resnets_{i}",
        )

    def transformer(self, i: int) -> SpatialTransformer:
        return SpatialTransformer(
            **self.shared(),
            heads=self.spec.heads,
            num_layers=self.spec.transformer_layers,
            only_cross_attention=self.spec.only_cross_attention,
            name=f"attentions_{i}",
        )


class DownBlock(_Block):
    """`CrossAttnDownBlock2D` or `DownBlock2D`: returns the output and the skips it leaves."""

    @nn.compact
    def __call__(self, x, temb, context) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        skips = []
        for i in range(self.spec.num_layers):
            x = self.resnet(i)(x, temb)
            if self.spec.has_attention:
                x = self.transformer(i)(x, context)
            skips.append(x)
        if self.spec.resample:
            padding = self.config.downsample_padding
            # diffusers pads a padding-0 downsampler on the bottom and right only.
            padding = ((0, 1), (0, 1)) if padding == 0 else padding
            x = Resample(**self.shared(), padding=padding, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(_Block):
    """`UNetMidBlock2DCrossAttn`: ResNet, then (transformer, ResNet) per layer."""

    @nn.compact
    def __call__(self, x, temb, context) -> jax.Array:
        x = self.resnet(0)(x, temb)
        for i in range(self.spec.num_layers):
            x = self.resnet(i + 1)(self.transformer(i)(x, context), temb)
        return x


class UpBlock(_Block):
    """`CrossAttnUpBlock2D` or `UpBlock2D`: each ResNet takes the last remaining skip
    concatenated to its input; the upsampler resizes to `upsample_size`."""

    upsample_size: tuple[int, int] | None = None

    @nn.compact
    def __call__(self, x, skips, temb, context) -> jax.Array:
        for i in range(self.spec.num_layers):
            x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = self.resnet(i)(x, temb)
            if self.spec.has_attention:
                x = self.transformer(i)(x, context)
        if self.spec.resample:
            x = Resample(**self.shared(), size=self.upsample_size, name="upsamplers_0")(x)
        return x


class Resample(_Part):
    """A stride-2 conv (`padding` as `Conv` takes it), or with `size` a nearest resize to
    it followed by a conv: the down- and upsamplers."""

    padding: Any = 1
    size: tuple[int, int] | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.size is None:
            return self.conv(x.shape[-1], "conv", stride=2, padding=self.padding)(x)
        return self.conv(x.shape[-1], "conv")(_resize_nearest(x, self.size))


# ---------------------------------------------------------------------------------------
# The model.


class UNet2DConditionModel(nn.Module):
    """diffusers' `UNet2DConditionModel` (see the module docstring) in Flax.

    Attributes:
      config: the architecture.
      dtype: the compute dtype (parameters stay float32; norms reduce in float32).
      attention: the kernel of every attention, one of `layers.ATTENTIONS`.
      remat: "none", or "blocks": each down, mid and up block under `nn.remat`, so the
        backward pass recomputes a block's activations instead of storing them.
      remat_policy: with "blocks", the name of a `jax.checkpoint_policies` policy saying
        what a block may keep ("" saves nothing but its inputs).
      lora_scale: alpha / r of LoRA adapters attached to any Dense or Conv (`layers`).
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    attention: str = "xla"
    remat: str = "none"
    remat_policy: str = ""
    lora_scale: float = 1.0

    def _block(self, cls: type[nn.Module]) -> type[nn.Module]:
        if self.remat not in REMATS:
            raise errors.ConfigError(f"unet remat {self.remat!r} is not one of {REMATS}")
        policy = None
        if self.remat_policy:
            policy = getattr(jax.checkpoint_policies, self.remat_policy, None)
            if policy is None:
                raise errors.ConfigError(
                    f"unet remat_policy {self.remat_policy!r} is not in jax.checkpoint_policies"
                )
        return cls if self.remat == "none" else nn.remat(cls, policy=policy)

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | int | float,
        encoder_hidden_states: jax.Array,
        added_cond_kwargs: Mapping[str, jax.Array] | None = None,
    ) -> jax.Array:
        """The model's prediction (noise, v or x0, as trained) for a noisy latent.

        Args:
          sample: [B, C, H, W] noisy latents (NCHW, like diffusers).
          timesteps: a scalar or [B] timesteps, int or float.
          encoder_hidden_states: [B, L, D] text encoder states.
          added_cond_kwargs: with `addition_embed_type="text_time"` (SDXL),
            {"text_embeds": [B, P], "time_ids": [B, K]}.

        Returns:
          [B, out_channels, H, W] in the compute dtype.
        """
        cfg = self.config
        if self.attention not in layers.ATTENTIONS:
            raise errors.ConfigError(
                f"unet attention {self.attention!r} is not one of {layers.ATTENTIONS}"
            )
        shared = dict(
            config=cfg, dtype=self.dtype, attention=self.attention, lora_scale=self.lora_scale
        )
        batch = sample.shape[0]
        x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        timesteps = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))
        t_emb = timestep_embedding(
            timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift
        ).astype(self.dtype)
        emb = TimestepEmbedding(**shared, features=cfg.time_embed_dim, name="time_embedding")(t_emb)
        if cfg.addition_embed_type == "text_time":
            emb = emb + self._text_time(shared, added_cond_kwargs, batch)
        context = encoder_hidden_states.astype(self.dtype)

        x = _conv(self, cfg.block_out_channels[0], "conv_in")(x)
        skips = [x]
        down = self._block(DownBlock)
        for i, spec in enumerate(cfg.down_specs()):
            x, block_skips = down(**shared, spec=spec, name=f"down_blocks_{i}")(x, emb, context)
            skips += block_skips
        if (spec := cfg.mid_spec()) is not None:
            x = self._block(MidBlock)(**shared, spec=spec, name="mid_block")(x, emb, context)
        up = self._block(UpBlock)
        for i, spec in enumerate(cfg.up_specs()):
            block_skips, skips = tuple(skips[-spec.num_layers :]), skips[: -spec.num_layers]
            # Upsample to the next skip's size: 2x, or less where a downsampler rounded up.
            size = tuple(skips[-1].shape[1:3]) if spec.resample else None
            x = up(**shared, spec=spec, upsample_size=size, name=f"up_blocks_{i}")(
                x, block_skips, emb, context
            )
        x = nn.silu(_group_norm(self, "conv_norm_out")(x))
        x = _conv(self, cfg.out_channels, "conv_out")(x)
        return jnp.transpose(x, (0, 3, 1, 2))

    def _text_time(self, shared, added_cond_kwargs, batch) -> jax.Array:
        """SDXL's added embedding: the pooled text embedding and the sinusoidal embedding of
        each time id (sizes and crop), concatenated, through `add_embedding`."""
        cfg = self.config
        missing = {"text_embeds", "time_ids"} - set(added_cond_kwargs or {})
        if missing:
            raise ValueError(f"addition_embed_type 'text_time' needs added_cond_kwargs {missing}")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        width = text_embeds.shape[-1] + time_ids.shape[-1] * cfg.addition_time_embed_dim
        if width != cfg.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds {text_embeds.shape} and time_ids {time_ids.shape} make {width} "
                f"features; projection_class_embeddings_input_dim is "
                f"{cfg.projection_class_embeddings_input_dim}"
            )
        time_embeds = timestep_embedding(
            time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
        ).reshape(batch, -1)
        add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
        embedding = TimestepEmbedding(**shared, features=cfg.time_embed_dim, name="add_embedding")
        return embedding(add.astype(self.dtype))

    def init_weights(self, rng: jax.Array) -> dict[str, Any]:
        """Freshly initialised parameters (a plain nested dict); shapes from the config."""
        cfg = self.config
        sample = jnp.zeros((1, cfg.in_channels, *cfg.sample_hw), jnp.float32)
        context = jnp.zeros((1, 1, cfg.context_dim), jnp.float32)
        added = None
        if cfg.addition_embed_type == "text_time":
            # Only the total width shapes add_embedding; one time id stands for however many.
            width = cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim
            added = {"text_embeds": jnp.zeros((1, width)), "time_ids": jnp.zeros((1, 1))}
        variables = self.init(rng, sample, jnp.zeros((1,), jnp.int32), context, added)
        return flax.core.unfreeze(variables["params"])
