"""The NSYNC gradient projection, written as an optax transform.

NSYNC (arXiv 2511.01517) trains on a batch of style images and, at every step, removes from
the positive gradient its component along the gradient of the same loss on a batch of
synthetic negatives. This module holds that projection, the variants the released reference
code runs, and PCGrad's conditional form, as one ``optax.GradientTransformationExtraArgs``
that goes first in ``optax.chain(nsync_projection(), clipping, optimizer)``.

Every reduction is a float32 ``sum(a * b)`` per leaf followed by a sum of scalars, so on an
FSDP-sharded pytree the only cross-device traffic is scalar all-reduces: no leaf is gathered
or flattened, and every output leaf keeps its input's sharding and dtype.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

RULES = ("paper", "v41", "v42", "conflicting")
GRANULARITIES = ("global", "per_tensor")

_F32 = jnp.float32


class NsyncProjectionState(NamedTuple):
    """State of :func:`nsync_projection`: diagnostics of the last update.

    Attributes:
      cosine: float32 scalar, cosine of the angle between g+ and g- over the whole tree at
        the last update (0 when either is zero), whatever the granularity.
      coefficient: float32 scalar, the projection coefficient used at the last update; for
        ``granularity="per_tensor"`` the mean of the per-leaf coefficients.
    """

    cosine: jax.Array
    coefficient: jax.Array


def tree_dot(a: Any, b: Any) -> jax.Array:
    """Inner product of two pytrees, accumulated in float32.

    Unlike ``jnp.vdot`` (and so ``optax.tree.vdot``), this multiplies elementwise and sums
    each leaf, which partitions cleanly when a contracting dimension is sharded: each device
    sums its shard and one scalar all-reduce combines them.

    Args:
      a: a pytree of arrays.
      b: a pytree of arrays with the same structure and leaf shapes as ``a``.

    Returns:
      A float32 scalar, ``sum_i <a_i, b_i>`` over the leaves (0 for an empty tree).
    """
    dots = jax.tree.leaves(jax.tree.map(_leaf_dot, a, b))
    return sum(dots, jnp.zeros((), _F32))


def _leaf_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sum(jnp.asarray(a).astype(_F32) * jnp.asarray(b).astype(_F32))


def _safe_div(num: jax.Array, sq_norm: jax.Array, eps: float) -> jax.Array:
    """``num / (sq_norm + eps)``, and 0 where ``sq_norm == 0`` (no NaN, even in gradients)."""
    nonzero = sq_norm > 0
    # Both branches are evaluated under jnp.where; dividing by 1 on the masked branch keeps
    # its forward value and its gradient finite when eps == 0.
    denom = jnp.where(nonzero, sq_norm + eps, jnp.ones_like(sq_norm))
    return jnp.where(nonzero, num / denom, jnp.zeros_like(num))


def _cosine(pn: jax.Array, pp: jax.Array, nn: jax.Array) -> jax.Array:
    nonzero = (pp > 0) & (nn > 0)
    # sqrt(pp) * sqrt(nn) rather than sqrt(pp * nn): the product can overflow float32.
    denom = jnp.sqrt(jnp.where(nonzero, pp, 1.0)) * jnp.sqrt(jnp.where(nonzero, nn, 1.0))
    cos = jnp.where(nonzero, pn / denom, 0.0)
    return jnp.clip(cos, -1.0, 1.0)


def _validate(rule: str, granularity: str, eps: float) -> None:
    if rule not in RULES:
        raise ValueError(f"Unknown NSYNC projection rule {rule!r}; expected one of {RULES}.")
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"Unknown projection granularity {granularity!r}; expected one of {GRANULARITIES}."
        )
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}.")


def project(
    pos: Any,
    neg: Any,
    rule: str = "paper",
    granularity: str = "global",
    eps: float = 1e-12,
) -> tuple[Any, jax.Array, jax.Array]:
    r"""Projects the positive gradient ``pos`` against the negative gradient ``neg``.

    With :math:`p` = ``pos``, :math:`n` = ``neg`` and :math:`s = p + n`:

    - ``"paper"``: :math:`u = p - \frac{\langle p, n\rangle}{\|n\|^2 + \epsilon}\, n`.
    - ``"v41"``: :math:`u = p - \frac{\langle p, s\rangle}{\|s\|^2 + \epsilon}\, s`.
    - ``"v42"``: :math:`u = 2p - \frac{\langle p, s\rangle}{\|s\|^2 + \epsilon}\, s`.
    - ``"conflicting"``:
      :math:`u = p - \frac{\min(\langle p, n\rangle, 0)}{\|n\|^2 + \epsilon}\, n`.

    The fraction is the coefficient; it is 0 when its denominator's squared norm is 0.

    Args:
      pos: pytree of positive gradients, g+.
      neg: pytree of negative gradients, g-, with the structure and shapes of ``pos``.
      rule: one of :data:`RULES`.
      granularity: ``"global"`` for one coefficient over the whole tree, ``"per_tensor"``
        for one per leaf.
      eps: added to the squared norm in the denominator; must be finite and >= 0.

    Returns:
      ``(u, cosine, coefficient)``: ``u`` has the structure of ``pos`` and each leaf the
      dtype of the matching ``pos`` leaf; ``cosine`` is the float32 cosine of ``pos`` and
      ``neg`` over the whole tree; ``coefficient`` the float32 coefficient (per-tensor: the
      mean over leaves).

    Raises:
      ValueError: for an unknown ``rule`` or ``granularity``, or a bad ``eps``.
    """
    eps = float(eps)
    _validate(rule, granularity, eps)

    treedef = jax.tree.structure(pos)
    neg_treedef = jax.tree.structure(neg)
    if neg_treedef != treedef:
        raise ValueError(
            f"negative gradients have tree structure {neg_treedef}, positive {treedef}."
        )
    pos_leaves = treedef.flatten_up_to(pos)
    neg_leaves = treedef.flatten_up_to(neg)

    p32 = [jnp.asarray(p).astype(_F32) for p in pos_leaves]
    n32 = [jnp.asarray(n).astype(_F32) for n in neg_leaves]
    pp = [jnp.sum(p * p) for p in p32]
    pn = [jnp.sum(p * n) for p, n in zip(p32, n32, strict=True)]
    nn = [jnp.sum(n * n) for n in n32]
    zero = jnp.zeros((), _F32)
    cosine = _cosine(sum(pn, zero), sum(pp, zero), sum(nn, zero))

    if rule in ("v41", "v42"):
        # s is formed elementwise, not as pp + 2pn + nn, so that s == 0 is detected exactly
        # when n == -p instead of being lost in cancellation.
        direction = [p + n for p, n in zip(p32, n32, strict=True)]
        p_dot_d = [jnp.sum(p * d) for p, d in zip(p32, direction, strict=True)]
        d_sq = [jnp.sum(d * d) for d in direction]
    else:
        direction, p_dot_d, d_sq = n32, pn, nn
    if granularity == "global":
        p_dot_d, d_sq = [sum(p_dot_d, zero)], [sum(d_sq, zero)]
    if rule == "conflicting":
        # After the sum over the tree for "global": PCGrad tests the sign of the full <p, n>.
        p_dot_d = [jnp.minimum(x, 0.0) for x in p_dot_d]
    coefficients = [_safe_div(x, y, eps) for x, y in zip(p_dot_d, d_sq, strict=True)]
    coefficient = sum(coefficients, zero) / max(len(coefficients), 1)
    if granularity == "global":
        coefficients = coefficients * len(p32)
    pos_scale = 2.0 if rule == "v42" else 1.0

    u_leaves = [
        (pos_scale * p - c * d).astype(jnp.asarray(orig).dtype)
        for p, d, c, orig in zip(p32, direction, coefficients, pos_leaves, strict=True)
    ]
    return treedef.unflatten(u_leaves), cosine, coefficient


def nsync_projection(
    rule: str = "paper",
    granularity: str = "global",
    eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    r"""Removes from the gradient its component along a negative gradient (NSYNC).

    The incoming ``updates`` are :math:`p = g^+`, the gradient of the loss on positive
    examples; the keyword argument ``negative_updates`` is :math:`n = g^-`, the gradient of
    the same loss on negatives. With :math:`s = p + n`, inner products and norms over the
    flattened tree (``granularity="global"``) or over each leaf (``"per_tensor"``):

    .. math::

      \text{paper:}\quad u &= p - \frac{\langle p, n\rangle}{\|n\|^2 + \epsilon}\, n
        \qquad(\langle u, n\rangle = 0)\\
      \text{v41:}\quad u &= p - \frac{\langle p, s\rangle}{\|s\|^2 + \epsilon}\, s\\
      \text{v42:}\quad u &= 2p - \frac{\langle p, s\rangle}{\|s\|^2 + \epsilon}\, s\\
      \text{conflicting:}\quad u &= p - \frac{\min(\langle p, n\rangle, 0)}
        {\|n\|^2 + \epsilon}\, n

    ``"paper"`` is the published rule. The released reference code accumulates gradients
    between its two backward passes, so it projects onto :math:`s` instead: ``"v41"``, and
    ``"v42"`` (its default), which also doubles :math:`p`. ``"conflicting"`` is PCGrad's
    rule: :math:`p` is left untouched unless it conflicts with :math:`n`. When the squared
    norm in a denominator is 0 the coefficient is 0 (no NaN, also with ``eps=0``).

    Inner products are accumulated in float32; each output leaf is cast back to its input
    dtype. Only elementwise ops and scalar reductions are used, so sharded leaves stay
    sharded and only scalars cross devices.

    References:
      NSYNC, `Negative Synthetic Image Generation for Contrastive Training
      <https://arxiv.org/abs/2511.01517>`_, 2025.

      Yu et al., `Gradient Surgery for Multi-Task Learning
      <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> tx = optax.chain(nsync_projection(), optax.clip_by_global_norm(1.0), optax.sgd(1.0))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> g_pos, g_neg = {"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([1.0, 0.0])}
      >>> u, state = tx.update(g_pos, state, params, negative_updates=g_neg)
      >>> u["w"]
      Array([-0., -1.], dtype=float32)

    Args:
      rule: one of :data:`RULES`: ``"paper"``, ``"v41"``, ``"v42"``, ``"conflicting"``.
      granularity: one of :data:`GRANULARITIES`: ``"global"`` (one coefficient over the
        whole tree, as the paper and the reference code do) or ``"per_tensor"``.
      eps: added to the squared norm in each denominator; finite and >= 0.

    A second keyword argument, ``unprojected_updates`` (optional), is added to :math:`u`
    after the projection: the gradient of an auxiliary loss that should not be projected
    (``step.AuxiliaryLoss(projected=False)``).

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires the
      keyword-only argument ``negative_updates`` and whose state is a
      :class:`NsyncProjectionState`.

    Raises:
      ValueError: for an unknown ``rule`` or ``granularity``, or ``eps`` negative or not
        finite.
    """
    eps = float(eps)
    _validate(rule, granularity, eps)

    def init_fn(params: optax.Params) -> NsyncProjectionState:
        del params
        return NsyncProjectionState(cosine=jnp.zeros((), _F32), coefficient=jnp.zeros((), _F32))

    def update_fn(
        updates: optax.Updates,
        state: NsyncProjectionState,
        params: optax.Params | None = None,
        *,
        negative_updates: optax.Updates,
        unprojected_updates: optax.Updates | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, NsyncProjectionState]:
        del state, params, extra_args
        u, cosine, coefficient = project(updates, negative_updates, rule, granularity, eps)
        if unprojected_updates is not None:
            u = jax.tree.map(lambda a, b: a + b.astype(a.dtype), u, unprojected_updates)
        return u, NsyncProjectionState(cosine=cosine, coefficient=coefficient)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
