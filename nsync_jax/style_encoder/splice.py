"""The prompt splice: style vectors in place of the placeholder token's input embedding.

A caption ends with ", in the style of sks."; `pos` is the index of the placeholder token
("sks"). With V ∈ R^{n×D} the style vectors and E the prompt's token embeddings (before
the position embeddings), the spliced sequence S of length L is

    S[j] = E[j]            for j < pos,
    S[j] = V[j − pos]      for pos ≤ j < pos + n,
    S[j] = E[j − n + 1]    for j ≥ pos + n,

i.e. V replaces the placeholder's row and the tokens after it ("." and EOS, then the
padding) shift right by n − 1; the last n − 1 rows fall off the end. Position
embeddings are then added and the frozen CLIP text transformer (encoder + final layer
norm) runs on S; its last hidden state conditions the UNet. `pos` is clamped to
[1, L − n − 2] so that V, "." and EOS fit in L (the paper's clamp pos + 10 ≤ 77 for
n = 8). A prompt without the placeholder (truncated) places V where the paper's
`attention_mask.sum() − 3` would: two tokens before EOS.

Our `CLIPTextModel` takes the spliced token embeddings as `token_embeds` (positions are
added inside, as for a plain prompt). Shapes are static and every row of the batch is
spliced at its own position (a `vmap`).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp

from nsync_jax import models
from nsync_jax import scope as scope_lib

Params = dict[str, Any]


def placeholder_positions(
    input_ids: jax.Array, placeholder_id: int, eos_id: int, num_tokens: int
) -> jax.Array:
    """[B] int32 splice positions: the placeholder's first index, clamped (module doc).

    Where a row has no placeholder (truncated), two tokens before its first EOS.
    """
    length = input_ids.shape[-1]
    if length < num_tokens + 3:
        raise ValueError(f"{num_tokens} style tokens do not fit a sequence of {length}")
    is_placeholder = input_ids == placeholder_id
    found = jnp.any(is_placeholder, axis=-1)
    first = jnp.argmax(is_placeholder, axis=-1)
    has_eos = jnp.any(input_ids == eos_id, axis=-1)
    eos = jnp.where(has_eos, jnp.argmax(input_ids == eos_id, axis=-1), length - 1)
    pos = jnp.where(found, first, eos - 2)
    return jnp.clip(pos, 1, length - num_tokens - 2).astype(jnp.int32)


def splice_embeddings(token_embeds: jax.Array, style: jax.Array, positions: jax.Array) -> jax.Array:
    """The spliced sequences [B, L, D] (module doc) from token embeddings [B, L, D], style
    vectors [B, n, D] and positions [B]; the result has `token_embeds`' dtype."""
    num_tokens = style.shape[1]

    def one(embeds, vectors, pos):
        j = jnp.arange(embeds.shape[0])
        shifted = embeds[jnp.where(j < pos, j, j - num_tokens + 1)]
        inside = (j >= pos) & (j < pos + num_tokens)
        styled = vectors[jnp.clip(j - pos, 0, num_tokens - 1)].astype(embeds.dtype)
        return jnp.where(inside[:, None], styled, shifted)

    return jax.vmap(one)(token_embeds, style, positions)


def encode_spliced(
    model: models.StableDiffusion,
    text_params: Params,
    input_ids: jax.Array,
    style: jax.Array,
    placeholder_id: int,
) -> jax.Array:
    """The UNet's context [B, L, D]: the frozen text encoder on `input_ids` [B, L] with
    `style` [B, n, D] spliced in at each row's placeholder (module doc)."""
    positions = placeholder_positions(
        input_ids, placeholder_id, model.tokenizer.eos_token_id, style.shape[1]
    )
    variables = {"params": text_params}
    encoder = model.text_encoder
    embeds = encoder.apply(variables, input_ids, method=encoder.embed_tokens)
    spliced = splice_embeddings(embeds, style, positions)
    return encoder.apply(variables, input_ids, token_embeds=spliced).last_hidden_state


def placeholder_token(
    model: models.StableDiffusion, params: Params, placeholder: str
) -> tuple[models.StableDiffusion, Params, int]:
    """(model, params, id) with `placeholder` one token of the tokenizer.

    SD's tokenizer has "sks" as one word: nothing changes. A tokenizer that splits it (the
    tiny one) gets it as a new token with a row in the embedding table (its value never
    matters: the splice replaces it).
    """
    ids = model.tokenizer(placeholder, add_special_tokens=False).input_ids
    if len(ids) == 1:
        return model, params, ids[0]
    logging.info("placeholder %r is %d tokens: added as a new token", placeholder, len(ids))
    return scope_lib.add_placeholder_token(model, params, placeholder, "style")
