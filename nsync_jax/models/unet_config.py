"""The UNet's architecture as a diffusers `unet/config.json` holds it (`UNetConfig`), and
its blocks as diffusers builds them from it (`BlockSpec`).

Values are read exactly as diffusers' PyTorch `UNet2DConditionModel` reads them:

- Heads: when `num_attention_heads` is None (every published SD config), the number of
  heads per block is `attention_head_dim` (a misnaming diffusers keeps for its 40k+
  configs); a block of C channels has heads of width C // heads.
- Per-block values (heads, `layers_per_block`, `transformer_layers_per_block`,
  `only_cross_attention`, `cross_attention_dim`) run deepest-first in the up path; an up
  block has `layers_per_block + 1` ResNets; the mid block takes the deepest block's heads
  and transformer depth, and `mid_block_type: null` means no mid block.
- A key this UNet does not implement is accepted only with the value that builds the same
  network; any other value is a `ConfigError` naming it, never silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from nsync_jax import errors

CROSS_DOWN, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID = "UNetMidBlock2DCrossAttn"

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
    # Heads per block when set. diffusers' PyTorch class refuses any value but None (its
    # Flax class took it): `to_dict` of such a config does not load there.
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
        size = self.sample_size
        sides = size if isinstance(size, tuple) else (size,)
        if len(sides) not in (1, 2) or not all(isinstance(n, int) and n > 0 for n in sides):
            raise _unsupported("sample_size", size, "an int or (height, width)")
        groups = self.norm_num_groups
        if not isinstance(groups, int) or any(c % groups for c in self.block_out_channels):
            raise _unsupported("norm_num_groups", groups, "must divide block_out_channels")
        for channels, heads in zip(self.block_out_channels, self.heads, strict=True):
            if not isinstance(heads, int) or not 1 <= heads <= channels:
                explicit = self.num_attention_heads is not None
                name = "num_attention_heads" if explicit else "attention_head_dim"
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
