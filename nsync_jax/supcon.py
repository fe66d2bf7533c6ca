"""Supervised contrastive losses (SupCon) in pure JAX: one modality, and image against text.

SupCon (Khosla et al. 2020) pulls together every pair of views that share a label and
pushes the rest apart. For L2-normalised features z of all N = B·V views, anchor i, the
contrast set A(i) = every view but i, and the positives P(i) = the views in A(i) whose
example shares a label with i's:

    L = −(τ / τ_base) · mean_{i : |P(i)| > 0} [ 1/|P(i)| · Σ_{p ∈ P(i)}
            log( exp(z_i·z_p / τ) / Σ_{a ∈ A(i)} exp(z_i·z_a / τ) ) ]

This is the reference implementation's contrast mode ``all`` (every view is an anchor),
with one change: the reference divides by |P(i)| unguarded, so an anchor without a
positive (a label seen once, one view) makes the loss NaN; here such anchors are left out
of the mean, and a batch without any positive gives 0. With two views and all labels
distinct, P(i) is the other view of i alone and L is NT-Xent (SimCLR). A mask may be given
instead of labels: `mask[i, j]` weighs pair (i, j) of examples (multi-label sets make it
"shares any label"; the weights enter both the sum and |P(i)|, as in the reference).

`cross_modal_supcon` is the inter-modal term: image anchors contrasted against the text
features of the batch and text anchors against the images, positives the pairs whose
labels match (the example's own caption included); the two directions are averaged. With
all labels distinct it is CLIP's symmetric InfoNCE.

Everything is computed in float32 from a [N, N] similarity matrix, so on a batch sharded
over a mesh XLA gathers the [N, D] features (small) once; the loss equals the one-device
value. This module imports nothing of the project.

References:
  Khosla et al., `Supervised Contrastive Learning <https://arxiv.org/abs/2004.11362>`_,
  NeurIPS 2020 (reference code: HobbitLong/SupContrast, ``losses.py``).

  Chen et al., `A Simple Framework for Contrastive Learning of Visual Representations
  <https://arxiv.org/abs/2002.05709>`_, ICML 2020 (NT-Xent).

  Radford et al., `Learning Transferable Visual Models From Natural Language Supervision
  <https://arxiv.org/abs/2103.00020>`_, ICML 2021 (CLIP's symmetric loss).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_F32 = jnp.float32
_NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """`x / ‖x‖` along `axis` in float32; a zero vector stays zero (finite gradient too)."""
    x = x.astype(_F32)
    squared = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, _NORM_EPS**2))


def label_mask(labels: jax.Array, other: jax.Array | None = None) -> jax.Array:
    """Float32 [B, B'] mask of pairs that share a label.

    Args:
      labels: int [B] (one label each) or multi-hot [B, K] (a pair is positive when the two
        share any of the K labels).
      other: the labels of the second set (default `labels`), same form.
    """
    other = labels if other is None else other
    if labels.ndim == 1:
        return (labels[:, None] == other[None, :]).astype(_F32)
    if labels.ndim == 2:
        shared = labels.astype(_F32) @ other.astype(_F32).T
        return (shared > 0).astype(_F32)
    raise ValueError(f"labels must be [B] or multi-hot [B, K], got shape {labels.shape}")


def _validate(temperature: float, base_temperature: float) -> None:
    for name, value in (("temperature", temperature), ("base_temperature", base_temperature)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def _pair_mask(
    batch: int, labels: jax.Array | None, mask: jax.Array | None, other: jax.Array | None = None
) -> jax.Array:
    if (labels is None) == (mask is None):
        raise ValueError("give exactly one of labels and mask")
    if mask is not None:
        if mask.shape != (batch, batch):
            raise ValueError(f"mask must be [{batch}, {batch}], got shape {mask.shape}")
        return mask.astype(_F32)
    if labels.shape[0] != batch:
        raise ValueError(f"{labels.shape[0]} labels for a batch of {batch}")
    return label_mask(labels, other)


def _mean_log_prob_pos(logits: jax.Array, contrast: jax.Array, positives: jax.Array):
    """Per anchor (row): mean log-probability of its positives over its contrast set, and
    whether it has any positive. `contrast` and `positives` are float masks."""
    log_denominator = jax.nn.logsumexp(logits, axis=1, where=contrast > 0, keepdims=True)
    log_prob = logits - log_denominator
    weight = jnp.sum(positives, axis=1)
    has_positive = weight > 0
    total = jnp.sum(jnp.where(positives > 0, positives * log_prob, 0.0), axis=1)
    return jnp.where(has_positive, total / jnp.where(has_positive, weight, 1.0), 0.0), has_positive


def _mean_over(values: jax.Array, valid: jax.Array) -> jax.Array:
    count = jnp.sum(valid.astype(_F32))
    return jnp.sum(jnp.where(valid, values, 0.0)) / jnp.maximum(count, 1.0)


def supcon(
    features: jax.Array,
    labels: jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    normalize: bool = True,
) -> jax.Array:
    """The SupCon loss (contrast mode ``all``) of `features`, positives from labels or mask.

    Args:
      features: [B, V, D], V views of each of B examples (e.g. the two branches).
      labels: int [B], or multi-hot [B, K] (positives share any label).
      mask: instead of labels, float [B, B] weights of example pairs (1: positive).
      temperature: τ.
      base_temperature: τ_base; the loss is scaled by τ / τ_base.
      normalize: L2-normalise the features first (the formula assumes unit vectors).

    Returns:
      A float32 scalar; anchors without a positive are left out of the mean, and it is 0
      when no anchor has one.

    Raises:
      ValueError: for a bad shape, both or neither of labels and mask, or a temperature
        that is not finite and positive.
    """
    _validate(temperature, base_temperature)
    if features.ndim != 3:
        raise ValueError(f"features must be [B, V, D], got shape {features.shape}")
    batch, views, _ = features.shape
    pairs = _pair_mask(batch, labels, mask)
    z = l2_normalize(features) if normalize else features.astype(_F32)
    # View-major order, as the reference's torch.cat(torch.unbind(features, 1)).
    z = jnp.concatenate([z[:, v] for v in range(views)], axis=0)
    logits = (z @ z.T) / temperature
    n = batch * views
    not_self = 1.0 - jnp.eye(n, dtype=_F32)
    positives = jnp.tile(pairs, (views, views)) * not_self
    mean_log_prob, valid = _mean_log_prob_pos(logits, not_self, positives)
    return -(temperature / base_temperature) * _mean_over(mean_log_prob, valid)


def cross_modal_supcon(
    image_features: jax.Array,
    text_features: jax.Array,
    labels: jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    normalize: bool = True,
) -> jax.Array:
    """Image anchors against the batch's text features and text anchors against its
    images, positives the pairs that share a label; the mean of the two directions.

    Args:
      image_features, text_features: [B, D] each; row i of both is example i.
      labels: int [B] or multi-hot [B, K]; example i's own text is always a positive of
        its image (a label equals itself).
      mask: instead of labels, float [B, B] weights of (image i, text j) pairs.
      temperature, base_temperature, normalize: as `supcon`.

    Returns:
      A float32 scalar; with all labels distinct, CLIP's symmetric InfoNCE
      (τ / τ_base) · (CE(image → text) + CE(text → image)) / 2.
    """
    _validate(temperature, base_temperature)
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"image and text features must both be [B, D], got {image_features.shape} and "
            f"{text_features.shape}"
        )
    pairs = _pair_mask(image_features.shape[0], labels, mask)
    if normalize:
        image_features, text_features = l2_normalize(image_features), l2_normalize(text_features)
    logits = image_features.astype(_F32) @ text_features.astype(_F32).T / temperature
    everything = jnp.ones_like(logits)
    image_to_text, valid_i = _mean_log_prob_pos(logits, everything, pairs)
    text_to_image, valid_t = _mean_log_prob_pos(logits.T, everything, pairs.T)
    both = 0.5 * (_mean_over(image_to_text, valid_i) + _mean_over(text_to_image, valid_t))
    return -(temperature / base_temperature) * both
