"""CLIP's text and vision transformers (Radford et al. 2021,
https://arxiv.org/abs/2103.00020) as Flax linen modules.

Both towers are pre-LayerNorm transformers over a sequence of width `hidden_size`:

    x ← x + out_proj(attention(q_proj, k_proj, v_proj of layer_norm1(x)))
    x ← x + fc2(act(fc1(layer_norm2(x))))

with `num_attention_heads` heads of softmax(Q Kᵀ / √head_dim) V and `act` quick GELU
(x · σ(1.702 x)) or exact GELU. The text tower embeds token ids plus learned positions,
attends causally, and ends with `final_layer_norm`; its pooled output is the final state
at the end-of-text token, found as transformers 5 finds it: for configs with the legacy
`eos_token_id == 2` (Stable Diffusion's) at the largest id of the row (CLIP's EOS is the
last id of its vocabulary), otherwise at the first position holding `eos_token_id`. The
vision tower embeds non-overlapping patches (a bias-free stride-`patch_size` convolution)
after a learned class token, adds learned positions, applies `pre_layrnorm` [sic], runs
the layers, and pools `post_layernorm` of the class token.

Configs are read from transformers' `config.json` (`CLIPTextConfig`, `CLIPVisionConfig`);
defaults are transformers' own, since older files list only the fields that differ.
Parameter trees are those of transformers' former Flax classes (`text_model/encoder/
layers/0/self_attn/q_proj/kernel`), so `weights.torch_key` maps the text encoder's to
PyTorch keys and checkpoints of the former classes still load. Every Dense is
`layers.Dense`, so LoRA adapters placed next to a kernel act (`lora_scale` = alpha / r).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from nsync_jax import errors
from nsync_jax.models import layers

Dtype = Any

ACTIVATIONS = ("quick_gelu", "gelu")
LEGACY_EOS_TOKEN_ID = 2
# transformers' former Flax CLIP initialisers (its weights were meant to be loaded); kept
# so that random towers (tests, the tiny SupCon encoder) keep their statistics.
_LINEAR_INIT = nn.initializers.normal(0.01)
_EMBED_INIT = nn.initializers.normal(0.01)
_CLASS_INIT = nn.initializers.normal(0.02)
_PROJECTION_INIT = nn.initializers.normal(0.02)


def _check_common(kind: str, config: Any) -> None:
    if config.hidden_act not in ACTIVATIONS:
        raise errors.ConfigError(
            f"{kind} config: hidden_act={config.hidden_act!r} is not supported "
            f"(one of {ACTIVATIONS})"
        )
    if config.hidden_size % config.num_attention_heads:
        raise errors.ConfigError(
            f"{kind} config: hidden_size={config.hidden_size} is not a multiple of "
            f"num_attention_heads={config.num_attention_heads}"
        )


def _fields_of(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in config.items() if k in names}


def _read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise errors.NotFound(f"{os.path.abspath(path)} not found")
    with open(path) as f:
        return json.load(f)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' `CLIPTextConfig` this module reads (defaults: its own).

    Attributes:
      vocab_size: rows of the token embedding.
      hidden_size: the width.
      intermediate_size: the MLP's inner width.
      num_hidden_layers: transformer layers.
      num_attention_heads: heads per attention.
      max_position_embeddings: the longest sequence.
      hidden_act: "quick_gelu" or "gelu" (exact).
      layer_norm_eps: LayerNorm ε.
      projection_dim: width of `text_projection` (`CLIPTextModelWithProjection`).
      bos_token_id: start-of-text id.
      eos_token_id: end-of-text id; 2 selects the legacy pooling (module docstring).
      pad_token_id: padding id.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    def __post_init__(self):
        _check_common("CLIP text", self)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> CLIPTextConfig:
        """The config of a transformers `text_encoder/config.json` dict (other keys ignored).

        Raises:
          errors.ConfigError: an activation this module lacks, or heads that do not divide
            the width (naming the field).
        """
        return cls(**_fields_of(cls, config))

    @classmethod
    def from_pretrained(cls, folder: str) -> CLIPTextConfig:
        """The config of `folder/config.json`.

        Raises:
          errors.NotFound: no such file (named).
          errors.ConfigError: as `from_dict`.
        """
        return cls.from_dict(_read_config(folder))

    def to_dict(self) -> dict[str, Any]:
        """The config as transformers' `CLIPTextConfig.from_dict` reads it."""
        return {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            **dataclasses.asdict(self),
        }


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of transformers' `CLIPVisionConfig` this module reads (defaults: its own).

    Attributes:
      hidden_size: the width.
      intermediate_size: the MLP's inner width.
      num_hidden_layers: transformer layers.
      num_attention_heads: heads per attention.
      image_size: the input side in pixels.
      patch_size: the side of a patch (divides `image_size`).
      num_channels: input channels.
      hidden_act: "quick_gelu" or "gelu" (exact).
      layer_norm_eps: LayerNorm ε.
      projection_dim: width of `visual_projection` (`CLIPVisionModelWithProjection`).
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self):
        _check_common("CLIP vision", self)
        if self.image_size % self.patch_size:
            raise errors.ConfigError(
                f"CLIP vision config: patch_size={self.patch_size} does not divide "
                f"image_size={self.image_size}"
            )

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> CLIPVisionConfig:
        """The config of a transformers `CLIPVisionConfig` dict (other keys ignored).

        Raises:
          errors.ConfigError: as the constructor, naming the field.
        """
        return cls(**_fields_of(cls, config))

    @classmethod
    def from_pretrained(cls, folder: str) -> CLIPVisionConfig:
        """The config of `folder/config.json`.

        Raises:
          errors.NotFound: no such file (named).
        """
        return cls.from_dict(_read_config(folder))

    def to_dict(self) -> dict[str, Any]:
        """The config as transformers' `CLIPVisionConfig.from_dict` reads it."""
        return {
            "architectures": ["CLIPVisionModel"],
            "model_type": "clip_vision_model",
            **dataclasses.asdict(self),
        }

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


# ---------------------------------------------------------------------------------------
# Outputs.


class CLIPTextOutput(NamedTuple):
    """`hidden_states` (with `output_hidden_states`): the embeddings, then each layer's
    output; the last is `last_hidden_state` before `final_layer_norm`."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None


class CLIPTextProjectionOutput(NamedTuple):
    """`CLIPTextOutput` with `text_embeds = text_projection(pooler_output)` first."""

    text_embeds: jax.Array
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None


class CLIPVisionOutput(NamedTuple):
    """`hidden_states` (with `output_hidden_states`): the embeddings after `pre_layrnorm`,
    then each layer's output."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None


class CLIPVisionProjectionOutput(NamedTuple):
    """`CLIPVisionOutput` with `image_embeds = visual_projection(pooler_output)` first."""

    image_embeds: jax.Array
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None


# ---------------------------------------------------------------------------------------
# The transformer, shared by both towers.


def _norm(eps: float, name: str | None = None) -> nn.LayerNorm:
    """A float32 LayerNorm with a two-pass variance, as PyTorch computes it."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, use_fast_variance=False, name=name)


def _layer_norm(x: jax.Array, eps: float, dtype: Dtype, name: str) -> jax.Array:
    """`_norm` named `name` in the calling (compact) module on x in float32, in `dtype`."""
    return _norm(eps, name)(x.astype(jnp.float32)).astype(dtype)


def _dense(
    module: nn.Module, features: int, name: str | None = None, init=_LINEAR_INIT, bias=True
) -> layers.Dense:
    """A `layers.Dense` with `module`'s dtype and LoRA scale."""
    return layers.Dense(
        features,
        use_bias=bias,
        dtype=module.dtype,
        lora_scale=module.lora_scale,
        kernel_init=init,
        name=name,
    )


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q kᵀ / √H + causal mask) v on [B, T, N, H]; the softmax in float32."""
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32) * scale
    t, s = scores.shape[-2:]
    visible = jnp.tril(jnp.ones((t, s), bool))
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", weights, v)


class CLIPAttention(nn.Module):
    """Multi-head self-attention (causal for text) with q/k/v/out projections."""

    num_heads: int
    causal: bool
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        heads = (batch, length, self.num_heads, width // self.num_heads)
        q, k, v = (_dense(self, width, n)(x).reshape(heads) for n in ("q_proj", "k_proj", "v_proj"))
        if self.causal:
            out = causal_attention(q, k, v)
        else:
            out = layers.attention(q, k, v, self.attention)
        return _dense(self, width, "out_proj")(out.reshape(batch, length, width))


class CLIPMLP(nn.Module):
    """fc2(act(fc1(x)))."""

    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = _dense(self, self.intermediate_size, "fc1")(x)
        if self.hidden_act == "quick_gelu":
            x = x * jax.nn.sigmoid(1.702 * x)
        else:
            x = jax.nn.gelu(x, approximate=False)
        return _dense(self, width, "fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """One pre-LayerNorm transformer layer (module docstring)."""

    config: CLIPTextConfig | CLIPVisionConfig
    causal: bool
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = _layer_norm(x, c.layer_norm_eps, self.dtype, "layer_norm1")
        x = x + CLIPAttention(
            c.num_attention_heads,
            self.causal,
            self.attention,
            self.dtype,
            self.lora_scale,
            name="self_attn",
        )(h)
        h = _layer_norm(x, c.layer_norm_eps, self.dtype, "layer_norm2")
        return x + CLIPMLP(
            c.intermediate_size, c.hidden_act, self.dtype, self.lora_scale, name="mlp"
        )(h)


class CLIPLayers(nn.Module):
    """The layers, named "0", "1", ...; returns the output and every layer's output."""

    config: CLIPTextConfig | CLIPVisionConfig
    causal: bool
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        outputs = []
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(
                self.config, self.causal, self.attention, self.dtype, self.lora_scale, name=str(i)
            )(x)
            outputs.append(x)
        return x, tuple(outputs)


class CLIPEncoder(nn.Module):
    """The layer stack (under `layers`, as transformers nests it)."""

    config: CLIPTextConfig | CLIPVisionConfig
    causal: bool
    attention: str = "xla"
    dtype: Dtype = jnp.float32
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        return CLIPLayers(
            self.config, self.causal, self.attention, self.dtype, self.lora_scale, name="layers"
        )(x)


# ---------------------------------------------------------------------------------------
# Text.


class CLIPTextEmbeddings(nn.Module):
    """Token embeddings (or given ones) plus learned position embeddings."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        self.token_embedding = nn.Embed(
            c.vocab_size, c.hidden_size, embedding_init=_EMBED_INIT, dtype=self.dtype
        )
        self.position_embedding = nn.Embed(
            c.max_position_embeddings, c.hidden_size, embedding_init=_EMBED_INIT, dtype=self.dtype
        )

    def __call__(self, input_ids: jax.Array, token_embeds: jax.Array | None = None) -> jax.Array:
        if token_embeds is None:
            token_embeds = self.token_embedding(input_ids.astype(jnp.int32))
        positions = self.position_embedding(jnp.arange(input_ids.shape[-1]))
        return token_embeds.astype(self.dtype) + positions[None]


class CLIPTextTransformer(nn.Module):
    """Embeddings, causal layers, `final_layer_norm`, pooling at the EOS token."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    lora_scale: float = 1.0

    def setup(self):
        self.embeddings = CLIPTextEmbeddings(self.config, self.dtype)
        self.encoder = CLIPEncoder(
            self.config, causal=True, dtype=self.dtype, lora_scale=self.lora_scale
        )
        self.final_layer_norm = _norm(self.config.layer_norm_eps)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """The token embeddings [B, L, D] of `input_ids`, before positions."""
        return self.embeddings.token_embedding(input_ids.astype(jnp.int32))

    def pool_positions(self, input_ids: jax.Array) -> jax.Array:
        """[B] index of each row's EOS token (module docstring)."""
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)

    def __call__(
        self,
        input_ids: jax.Array,
        output_hidden_states: bool = False,
        token_embeds: jax.Array | None = None,
    ) -> CLIPTextOutput:
        embedded = self.embeddings(input_ids, token_embeds)
        hidden, layer_outputs = self.encoder(embedded)
        last = self.final_layer_norm(hidden.astype(jnp.float32)).astype(self.dtype)
        pooled = last[jnp.arange(last.shape[0]), self.pool_positions(input_ids)]
        states = (embedded, *layer_outputs) if output_hidden_states else None
        return CLIPTextOutput(last, pooled, states)


class CLIPTextModel(nn.Module):
    """CLIP's text tower (transformers' `CLIPTextModel`); parameters under `text_model`.

    `__call__(input_ids [B, L], output_hidden_states=False, token_embeds=None)`:
    `token_embeds` [B, L, D], when given, replaces the token-embedding lookup (positions
    are still added and `input_ids` still picks the pooled position), e.g. to splice
    learned vectors into a prompt.

    Attributes:
      config: the architecture.
      dtype: the computation dtype (LayerNorms and the softmax run in float32).
      lora_scale: alpha / r of LoRA adapters in the tree.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    lora_scale: float = 1.0

    def setup(self):
        self.text_model = CLIPTextTransformer(self.config, self.dtype, self.lora_scale)

    def __call__(
        self,
        input_ids: jax.Array,
        output_hidden_states: bool = False,
        token_embeds: jax.Array | None = None,
    ) -> CLIPTextOutput:
        return self.text_model(input_ids, output_hidden_states, token_embeds)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """The token embeddings [B, L, D] of `input_ids` (for `token_embeds`)."""
        return self.text_model.embed_tokens(input_ids)

    def init_weights(self, rng: jax.Array, input_shape: tuple[int, int]) -> dict[str, Any]:
        """Random parameters for `input_shape` (batch, length) ids."""
        return self.init(rng, jnp.zeros(input_shape, jnp.int32))["params"]


class CLIPTextModelWithProjection(CLIPTextModel):
    """`CLIPTextModel` plus `text_projection` (bias-free) of the pooled output."""

    def setup(self):
        super().setup()
        self.text_projection = _dense(
            self, self.config.projection_dim, init=_PROJECTION_INIT, bias=False
        )

    def __call__(
        self,
        input_ids: jax.Array,
        output_hidden_states: bool = False,
        token_embeds: jax.Array | None = None,
    ) -> CLIPTextProjectionOutput:
        out = self.text_model(input_ids, output_hidden_states, token_embeds)
        return CLIPTextProjectionOutput(self.text_projection(out.pooler_output), *out)


# ---------------------------------------------------------------------------------------
# Vision.


def _blank_image(config: CLIPVisionConfig) -> jax.Array:
    return jnp.zeros((1, config.image_size, config.image_size, config.num_channels))


class CLIPVisionEmbeddings(nn.Module):
    """The class token and the patches (bias-free conv), plus learned positions."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        class_embedding = self.param("class_embedding", _CLASS_INIT, (c.hidden_size,))
        patches = layers.Conv(
            c.hidden_size,
            (c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_EMBED_INIT,
            name="patch_embedding",
        )(pixels)
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, c.hidden_size)
        cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, c.hidden_size))
        positions = nn.Embed(
            c.num_positions,
            c.hidden_size,
            embedding_init=_EMBED_INIT,
            dtype=self.dtype,
            name="position_embedding",
        )(jnp.arange(c.num_positions))
        return jnp.concatenate([cls, patches], axis=1) + positions[None]


class CLIPVisionTransformer(nn.Module):
    """CLIP's vision tower (what transformers' `CLIPVisionModel` holds as `vision_model`).

    `__call__(pixels [B, S, S, C] NHWC at `config.image_size`, normalised as the
    checkpoint expects; output_hidden_states=False)`.

    Attributes:
      config: the architecture.
      dtype: the computation dtype (LayerNorms and the softmax run in float32).
      attention: the attention kernel, one of `layers.ATTENTIONS`.
      lora_scale: alpha / r of LoRA adapters in the tree.
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    attention: str = "xla"
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, pixels: jax.Array, output_hidden_states: bool = False) -> CLIPVisionOutput:
        c = self.config
        expected = (c.image_size, c.image_size, c.num_channels)
        if tuple(pixels.shape[1:]) != expected:
            raise ValueError(
                f"CLIP vision tower takes NHWC pixels [B, {expected}], got {tuple(pixels.shape)}"
            )
        h = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(pixels)
        h = _layer_norm(h, c.layer_norm_eps, self.dtype, "pre_layrnorm")
        last, layer_outputs = CLIPEncoder(
            c, False, self.attention, self.dtype, self.lora_scale, name="encoder"
        )(h)
        pooled = _layer_norm(last[:, 0], c.layer_norm_eps, self.dtype, "post_layernorm")
        states = (h, *layer_outputs) if output_hidden_states else None
        return CLIPVisionOutput(last, pooled, states)

    def init_weights(self, rng: jax.Array) -> dict[str, Any]:
        """Random parameters."""
        return self.init(rng, _blank_image(self.config))["params"]


class CLIPVisionModelWithProjection(nn.Module):
    """The vision tower under `vision_model` plus `visual_projection` (bias-free) of the
    pooled output: transformers' `CLIPVisionModelWithProjection` and the image half of
    `CLIPModel`. Attributes as `CLIPVisionTransformer`'s."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    attention: str = "xla"
    lora_scale: float = 1.0

    def setup(self):
        self.vision_model = CLIPVisionTransformer(
            self.config, self.dtype, self.attention, self.lora_scale
        )
        self.visual_projection = _dense(
            self, self.config.projection_dim, init=_PROJECTION_INIT, bias=False
        )

    def __call__(
        self, pixels: jax.Array, output_hidden_states: bool = False
    ) -> CLIPVisionProjectionOutput:
        out = self.vision_model(pixels, output_hidden_states)
        return CLIPVisionProjectionOutput(self.visual_projection(out.pooler_output), *out)

    def init_weights(self, rng: jax.Array) -> dict[str, Any]:
        """Random parameters."""
        return self.init(rng, _blank_image(self.config))["params"]
