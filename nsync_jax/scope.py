"""Trainable scopes: which parameters train, and how they rejoin the frozen ones.

A scope splits the model's parameters `{"unet", "vae", "text_encoder"}` into a trainable
tree (the only one that gets gradients and optimizer state) and a frozen tree, and merges
them back for `apply`. Scopes are chosen by name from `config.train.scope`:

- `unet`: every UNet parameter trains (full fine-tuning; our headline).
- `unet_text_encoder`: the UNet and the whole CLIP text encoder train (diffusers' and
  kohya's `--train_text_encoder`; what pretraining a base from scratch needs).
- `textual_inversion`: one new placeholder token, initialised from a word's embedding,
  spliced into the frozen CLIP embedding table; only that row trains (what the NSYNC
  reference code trains). A run of several styles (`data.styles`) adds one token per
  style, consecutive rows, and trains those rows.
- `lora`: low-rank adapters on chosen UNet (and text-encoder) layers (`lora.py`); the base
  stays frozen, in `lora.base_dtype`.
- `lora_ti`: pivotal tuning, `lora` plus a textual-inversion token; both train and export.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from nsync_jax import lora, models

Params = dict[str, Any]

_EMBEDDING_PATH = ("text_model", "embeddings", "token_embedding", "embedding")


def _token_row(params: Params, token_id: int, count: int = 1) -> jax.Array:
    """Rows `token_id` .. `token_id + count - 1` of the text encoder's token-embedding
    table, as [count, D]."""
    return _get_path(params["text_encoder"], _EMBEDDING_PATH)[token_id : token_id + count]


def _with_token_row(params: Params, token_id: int, row: jax.Array, dtype: Any) -> Params:
    """`params` with the embedding table's rows from `token_id` on set to `row`
    ([count, D]); the table and the rows are both cast to `dtype` (the one splice every
    token scope uses)."""
    path = ("text_encoder", *_EMBEDDING_PATH)
    table = _get_path(params, path).astype(dtype)
    rows = slice(token_id, token_id + row.shape[0])
    return _set_path(params, path, table.at[rows].set(row.astype(dtype)))


class Scope(abc.ABC):
    """Splits parameters into trainable and frozen trees and merges them back, and says
    what an export needs: which components changed and which token row was learned.

    Attributes:
      name: the `train.scope` value.
      token_id: the learned placeholder token's id (the last embedding row), or None; with
        several styles' tokens, the first of them.
      token_count: how many placeholder tokens (consecutive ids from `token_id`) train.
    """

    name: str
    token_id: int | None = None
    token_count: int = 1

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Every learned placeholder token's id; () if the scope learns none."""
        if self.token_id is None:
            return ()
        return tuple(range(self.token_id, self.token_id + self.token_count))

    @abc.abstractmethod
    def split(self, params: Params) -> tuple[Any, Params]:
        """Returns (trainable, frozen)."""

    @abc.abstractmethod
    def merge(self, trainable: Any, frozen: Params) -> Params:
        """Returns full parameters for `apply`, differentiable in `trainable`."""

    @abc.abstractmethod
    def trained_components(self) -> tuple[str, ...]:
        """The components (`unet`, `text_encoder`) whose base weights training changed;
        an export converts these and copies the others from the base folder. A learned
        token row alone does not count: it is exported as an embeddings file."""

    def export_params(self, trainable: Any, frozen: Params) -> Params:
        """The full parameters an export writes (plain `{"unet", "vae",
        "text_encoder"}` trees, nothing attached)."""
        return self.merge(trainable, frozen)


class UnetScope(Scope):
    name = "unet"

    def split(self, params: Params) -> tuple[Any, Params]:
        frozen = {k: v for k, v in params.items() if k != "unet"}
        return params["unet"], frozen

    def merge(self, trainable: Any, frozen: Params) -> Params:
        return {**frozen, "unet": trainable}

    def trained_components(self) -> tuple[str, ...]:
        return ("unet",)


class UnetTextEncoderScope(Scope):
    name = "unet_text_encoder"

    def split(self, params: Params) -> tuple[Any, Params]:
        frozen = {k: v for k, v in params.items() if k not in ("unet", "text_encoder")}
        return {"unet": params["unet"], "text_encoder": params["text_encoder"]}, frozen

    def merge(self, trainable: Any, frozen: Params) -> Params:
        return {**frozen, **trainable}

    def trained_components(self) -> tuple[str, ...]:
        return ("unet", "text_encoder")


def _get_path(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set_path(tree: Any, path: tuple[str, ...], value: Any) -> Any:
    """Copy of nested dict `tree` with the leaf at `path` replaced."""
    if not path:
        return value
    head, *rest = path
    return {**tree, head: _set_path(tree[head], tuple(rest), value)}


@dataclasses.dataclass
class TextualInversionScope(Scope):
    """Trainable token embedding rows (one per style); everything else frozen.

    Attributes:
      token_id: the (first) placeholder's id in the (extended) tokenizer.
      token_count: placeholders, at ids `token_id` on; the trainable row is [count, D].
    """

    token_id: int
    token_count: int = 1
    name: str = "textual_inversion"

    def split(self, params: Params) -> tuple[Any, Params]:
        return {"token_embedding": _token_row(params, self.token_id, self.token_count)}, params

    def merge(self, trainable: Any, frozen: Params) -> Params:
        dtype = _get_path(frozen, ("text_encoder", *_EMBEDDING_PATH)).dtype
        return _with_token_row(frozen, self.token_id, trainable["token_embedding"], dtype)

    def trained_components(self) -> tuple[str, ...]:
        return ()


def add_placeholder_token(
    model: models.StableDiffusion, params: Params, placeholder: str, initializer: str
) -> tuple[models.StableDiffusion, Params, int]:
    """Adds `placeholder` to a copy of the tokenizer and a row to the embedding table.

    The new row starts as the embedding of `initializer` (the mean of its tokens' rows if
    the tokenizer splits it), as textual inversion does.
    """
    return add_placeholder_tokens(model, params, (placeholder,), initializer)


def add_placeholder_tokens(
    model: models.StableDiffusion,
    params: Params,
    placeholders: tuple[str, ...],
    initializer: str,
) -> tuple[models.StableDiffusion, Params, int]:
    """`add_placeholder_token` for several placeholders (one per style), at consecutive
    ids; returns the first id. Every new row starts as `initializer`'s embedding."""
    if len(set(placeholders)) != len(placeholders) or not placeholders:
        raise ValueError(f"style tokens must be distinct and at least one: {placeholders}")
    tokenizer = copy.deepcopy(model.tokenizer)
    for placeholder in placeholders:
        # A word the vocabulary already has would be hijacked for every prompt using it.
        known_word = len(tokenizer(placeholder, add_special_tokens=False).input_ids) == 1
        if known_word or tokenizer.add_tokens(placeholder) != 1:
            raise ValueError(
                f"style token {placeholder!r} is already in the tokenizer; "
                "pick a new placeholder string such as '<monet>'"
            )
    token_id = tokenizer.convert_tokens_to_ids(placeholders[0])
    init_ids = tokenizer(initializer, add_special_tokens=False).input_ids
    if not init_ids:
        raise ValueError(f"train.initializer_token {initializer!r} tokenizes to nothing")
    if len(init_ids) > 1:
        logging.info(
            "initializer %r is %d tokens; the placeholder starts at their mean embedding",
            initializer,
            len(init_ids),
        )
    table = _get_path(params["text_encoder"], _EMBEDDING_PATH)
    if token_id != table.shape[0]:
        raise ValueError(
            f"tokenizer has {token_id} tokens but the text encoder's embedding table has "
            f"{table.shape[0]} rows; they must match before adding {placeholder!r}"
        )
    new_row = jnp.mean(table[jnp.asarray(init_ids)], axis=0, keepdims=True)
    new_rows = jnp.repeat(new_row, len(placeholders), axis=0)
    table = jnp.concatenate([table, new_rows.astype(table.dtype)], axis=0)
    text_params = _set_path(params["text_encoder"], _EMBEDDING_PATH, table)
    text_config = dataclasses.replace(model.text_encoder.config, vocab_size=table.shape[0])
    text_encoder = model.text_encoder.clone(config=text_config)
    model = dataclasses.replace(model, tokenizer=tokenizer, text_encoder=text_encoder)
    return model, {**params, "text_encoder": text_params}, token_id


@dataclasses.dataclass
class LoraScope(Scope):
    """LoRA adapters train (and, with `token_id`, one token embedding: pivotal tuning).

    The trainable tree is `{"lora": {component: {<module path>: {"lora_a", "lora_b"}}}}`
    plus `"token_embedding"` ([1, D]) for `lora_ti`; the frozen tree is every base
    parameter in `base_dtype`.

    Attributes:
      settings: rank, alpha, targets, init and implementation.
      seed: seed of the adapters' random A.
      base_dtype: dtype of the frozen base (bfloat16 halves its memory).
      token_id: the (first) placeholder's id for pivotal tuning; None for plain LoRA.
      token_count: placeholders (one per style) at ids `token_id` on.
    """

    settings: lora.LoraSettings
    seed: int
    base_dtype: Any
    token_id: int | None = None
    token_count: int = 1
    name: str = "lora"

    def split(self, params: Params) -> tuple[Any, Params]:
        trainable = {"lora": lora.init_adapters(params, self.settings, self.seed)}
        if self.token_id is not None:
            row = _token_row(params, self.token_id, self.token_count)
            trainable["token_embedding"] = row.astype(lora.ADAPTER_DTYPE)
        return trainable, models.cast_floating(params, self.base_dtype)

    def _with_token(self, trainable: Any, frozen: Params) -> Params:
        if self.token_id is None:
            return frozen
        row = trainable["token_embedding"]
        # The table is upcast to the row's dtype so a bf16 base does not round the row.
        return _with_token_row(frozen, self.token_id, row, row.dtype)

    def merge(self, trainable: Any, frozen: Params) -> Params:
        params = self._with_token(trainable, frozen)
        return lora.apply_adapters(params, trainable["lora"], self.settings)

    def merged_params(self, trainable: Any, frozen: Params) -> Params:
        """Full params with the adapters folded into the kernels (what export writes)."""
        params = self._with_token(trainable, frozen)
        return lora.merged_params(params, trainable["lora"], self.settings)

    def trained_components(self) -> tuple[str, ...]:
        return tuple(c for c in ("unet", "text_encoder") if self.settings.targets[c])

    def export_params(self, trainable: Any, frozen: Params) -> Params:
        return self.merged_params(trainable, frozen)


def make_scope(
    train_config: ml_collections.ConfigDict,
    model: models.StableDiffusion,
    params: Params,
    lora_config: ml_collections.ConfigDict | None = None,
    style_tokens: tuple[str, ...] | None = None,
) -> tuple[Scope, models.StableDiffusion, Params]:
    """The scope named by `train_config.scope`, with the model and params it needs.

    `lora_config` (`config.lora`) is required by the `lora` and `lora_ti` scopes. With
    `lora.implementation="intercept"` the returned model applies the adapters itself
    (`lora.with_adapter_scale`). `style_tokens` are the run's style words
    (`data.styles.run_tokens`); default `(train_config.style_token,)`. The token scopes
    learn one placeholder per word.
    """
    if style_tokens is None:
        style_tokens = (train_config.style_token,)
    if train_config.scope in ("lora", "lora_ti"):
        if lora_config is None:
            raise ValueError(f"train.scope={train_config.scope!r} needs the `lora` config group")
        settings = lora.LoraSettings.from_config(lora_config)
        token_id = None
        if train_config.scope == "lora_ti":
            model, params, token_id = add_placeholder_tokens(
                model, params, style_tokens, train_config.initializer_token
            )
        if settings.implementation == "intercept":
            model = lora.with_adapter_scale(model, settings.scale)
        lora_scope = LoraScope(
            settings,
            seed=lora_config.seed,
            base_dtype=models.dtype_from_name(lora_config.base_dtype),
            token_id=token_id,
            token_count=len(style_tokens),
            name=train_config.scope,
        )
        return lora_scope, model, params
    if train_config.scope == "unet":
        return UnetScope(), model, params
    if train_config.scope == "unet_text_encoder":
        return UnetTextEncoderScope(), model, params
    if train_config.scope == "textual_inversion":
        model, params, token_id = add_placeholder_tokens(
            model, params, style_tokens, train_config.initializer_token
        )
        return TextualInversionScope(token_id, len(style_tokens)), model, params
    raise ValueError(f"train.scope={train_config.scope!r}: expected one of {sorted(SCOPES)}")


SCOPES = ("lora", "lora_ti", "textual_inversion", "unet", "unet_text_encoder")
