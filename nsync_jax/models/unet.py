"""The Stable Diffusion UNet (`UNet2DConditionModel`) in Flax linen, built from a diffusers
`unet/config.json`.

The network is diffusers' PyTorch `UNet2DConditionModel` for the configs Stable Diffusion
1.x, 2.x and SDXL use: conv_in, a sinusoidal timestep embedding through two linears (plus,
for SDXL, `text_time` added conditioning), down blocks of ResNets with optional spatial
transformers, a cross-attention mid block, up blocks fed the down path's skips, and
GroupNorm-SiLU-conv_out. Inputs and outputs are NCHW like diffusers; inside it is NHWC.

Parameter names are the ones diffusers' Flax UNet used (`down_blocks_0/resnets_0/conv1/
kernel`), so `weights.torch_key` maps each to its PyTorch key and old checkpoints resume.

Head counts are read the way diffusers reads them: when `num_attention_heads` is None,
`attention_head_dim` is the number of heads (an old misnaming kept for 40k+ configs), and a
block of C channels with n heads has heads of width C // n.
"""

from __future__ import annotations

import dataclasses
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

Dtype = Any

CROSS_DOWN, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID = "UNetMidBlock2DCrossAttn"
REMATS = ("none", "blocks")

# diffusers config keys that are not fields: each with the only value implemented here.
_FIXED = {
    "dropout": 0.0,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_class_embeds": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "reverse_transformer_layers_per_block": None,
}
# diffusers config keys that only configure blocks this network never builds (the Simple*
# and ResnetDownsample blocks, the `text` addition embedding): any value builds the same net.
_IGNORED = frozenset(
    {
        "resnet_skip_time_act",
        "resnet_out_scale_factor",
        "cross_attention_norm",
        "mid_block_only_cross_attention",
        "addition_embed_type_num_heads",
    }
)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One down, mid or up block as diffusers builds it from the config.

    Attributes:
      out_channels: the block's channels.
      num_layers: ResNets in the block (an up block has `layers_per_block + 1`).
      has_attention: whether a spatial transformer follows each ResNet.
      heads: attention heads of its transformers (width `out_channels // heads`).
      transformer_layers: transformer blocks in each spatial transformer.
      only_cross_attention: whether attn1 attends to the text instead of the image.
      resample: whether the block ends with a down- or upsampler.
      output_scale_factor: ResNet outputs are divided by it (the mid block's config value).
    """

    out_channels: int
    num_layers: int
    has_attention: bool
    heads: int
    transformer_layers: int
    only_cross_attention: bool
    resample: bool
    output_scale_factor: float = 1.0


def _tuples(value: Any) -> Any:
    """JSON lists as tuples (one level deeper for nested lists), so the config is hashable."""
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


def _lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_lists(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The fields of a diffusers `unet/config.json` this UNet implements (diffusers'
    defaults, which are SD 1.x's). Per-block fields take an int or one value per block.

    Raises:
      errors.ConfigError: at construction, a value this implementation does not build.
    """

    sample_size: int | tuple[int, int] = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, DOWN)
    mid_block_type: str | None = MID  # None: no mid block, as in diffusers.
    up_block_types: tuple[str, ...] = (UP, CROSS_UP, CROSS_UP, CROSS_UP)
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self):
        for field in dataclasses.fields(self):  # Lists (JSON) as tuples: hashable, comparable.
            object.__setattr__(self, field.name, _tuples(getattr(self, field.name)))
        self._validate()

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> UNetConfig:
        """The config of a diffusers `unet/config.json` dict.

        Keys starting with `_` and keys that configure blocks this UNet never builds are
        skipped; every other key must be a field or hold the one value implemented.

        Raises:
          errors.ConfigError: an unknown key or an unsupported value, naming it.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED:
                continue
            if key in _FIXED:
                if value != _FIXED[key]:
                    raise _unsupported(key, value, f"only {_FIXED[key]!r} is implemented")
            elif key in names:
                kwargs[key] = value
            else:
                raise errors.ConfigError(f"unet config has an unknown key {key!r}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A diffusers `UNet2DConditionModel` config dict (JSON-ready) for this UNet."""
        fields = {f.name: _lists(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"_class_name": "UNet2DConditionModel", **fields}

    # --- Per-block values, read as diffusers reads them. --------------------------------

    def per_block(self, name: str) -> tuple[Any, ...]:
        """Field `name` as one value per down block."""
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * len(self.down_block_types)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block (`attention_head_dim` when `num_attention_heads`
        is None: the diffusers misnaming)."""
        if self.num_attention_heads is not None:
            return self.per_block("num_attention_heads")
        return self.per_block("attention_head_dim")

    @property
    def context_dim(self) -> int:
        """Width of the text encoder's hidden states."""
        return self.per_block("cross_attention_dim")[0]

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def sample_hw(self) -> tuple[int, int]:
        size = self.sample_size
        return tuple(size) if isinstance(size, tuple) else (size, size)

    def down_specs(self) -> tuple[BlockSpec, ...]:
        n = len(self.down_block_types)
        return tuple(
            BlockSpec(
                out_channels=self.block_out_channels[i],
                num_layers=self.per_block("layers_per_block")[i],
                has_attention=kind == CROSS_DOWN,
                heads=self.heads[i],
                transformer_layers=self.per_block("transformer_layers_per_block")[i],
                only_cross_attention=self.per_block("only_cross_attention")[i],
                resample=i < n - 1,
            )
            for i, kind in enumerate(self.down_block_types)
        )

    def mid_spec(self) -> BlockSpec | None:
        if self.mid_block_type is None:
            return None
        return BlockSpec(
            out_channels=self.block_out_channels[-1],
            num_layers=1,
            has_attention=True,
            heads=self.heads[-1],
            transformer_layers=self.per_block("transformer_layers_per_block")[-1],
            only_cross_attention=False,  # The cross-attention mid block has no such option.
            resample=False,
            output_scale_factor=self.mid_block_scale_factor,
        )

    def up_specs(self) -> tuple[BlockSpec, ...]:
        """Up blocks take the per-block values in reverse (deepest first)."""
        n = len(self.up_block_types)
        rev = lambda name: self.per_block(name)[::-1]  # noqa: E731
        return tuple(
            BlockSpec(
                out_channels=self.block_out_channels[::-1][i],
                num_layers=rev("layers_per_block")[i] + 1,
                has_attention=kind == CROSS_UP,
                heads=self.heads[::-1][i],
                transformer_layers=rev("transformer_layers_per_block")[i],
                only_cross_attention=rev("only_cross_attention")[i],
                resample=i < n - 1,
            )
            for i, kind in enumerate(self.up_block_types)
        )

    def _validate(self) -> None:
        fixed = {
            "act_fn": ("silu",),
            "dual_cross_attention": (False,),
            "resnet_time_scale_shift": ("default",),
            "class_embed_type": (None,),
            "time_cond_proj_dim": (None,),
            "conv_in_kernel": (3,),
            "conv_out_kernel": (3,),
            "mid_block_type": (MID, None),
            "addition_embed_type": (None, "text_time"),
        }
        for name, allowed in fixed.items():
            if getattr(self, name) not in allowed:
                raise _unsupported(name, getattr(self, name), f"implemented: {allowed}")
        for name, allowed in (
            ("down_block_types", (CROSS_DOWN, DOWN)),
            ("up_block_types", (CROSS_UP, UP)),
        ):
            for kind in getattr(self, name):
                if kind not in allowed:
                    raise _unsupported(name, getattr(self, name), f"implemented: {allowed}")
        n = len(self.down_block_types)
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise errors.ConfigError(
                "unet config needs as many down_block_types, up_block_types and "
                f"block_out_channels, got {n}, {len(self.up_block_types)}, "
                f"{len(self.block_out_channels)}"
            )
        per_block = (
            "only_cross_attention",
            "layers_per_block",
            "cross_attention_dim",
            "transformer_layers_per_block",
            "attention_head_dim",
            "num_attention_heads",
        )
        for name in per_block:
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise _unsupported(name, value, f"needs one value per block ({n})")
        for value in self.per_block("transformer_layers_per_block"):
            if not isinstance(value, int):  # Nested: diffusers' asymmetric UNets.
                raise _unsupported("transformer_layers_per_block", value, "ints only")
        if len(set(self.per_block("cross_attention_dim"))) != 1:
            # All blocks attend to the same text states, so they must share one width.
            raise _unsupported("cross_attention_dim", self.cross_attention_dim, "one width")
        groups = self.norm_num_groups
        if not isinstance(groups, int) or any(c % groups for c in self.block_out_channels):
            raise _unsupported("norm_num_groups", groups, "must divide block_out_channels")
        for channels, heads in zip(self.block_out_channels, self.heads, strict=True):
            if not isinstance(heads, int) or not 1 <= heads <= channels:
                name = "num_attention_heads" if self.num_attention_heads else "attention_head_dim"
                raise _unsupported(name, getattr(self, name), "heads must be 1..channels")
        if self.addition_embed_type == "text_time" and not (
            isinstance(self.addition_time_embed_dim, int)
            and isinstance(self.projection_class_embeddings_input_dim, int)
        ):
            raise _unsupported(
                "addition_embed_type",
                "text_time",
                "needs addition_time_embed_dim and projection_class_embeddings_input_dim",
            )


def _unsupported(name: str, value: Any, why: str) -> errors.ConfigError:
    return errors.ConfigError(f"unet config {name}={value!r} is not supported ({why})")


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
        if self.config.upcast_attention:  # SD 2.x: scores overflow fp16, so all of it in fp32.
            q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
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
