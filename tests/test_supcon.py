"""Tests of nsync_jax.supcon: a NumPy reference of the formula, NT-Xent and CLIP as special
cases, invariances, anchors without positives, gradients, and a sharded batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nsync_jax import supcon as supcon_lib

supcon = jax.jit(
    supcon_lib.supcon, static_argnames=("temperature", "base_temperature", "normalize")
)
cross_modal = jax.jit(
    supcon_lib.cross_modal_supcon,
    static_argnames=("temperature", "base_temperature", "normalize"),
)


# --------------------------------------------------------------------------------------------
# NumPy float64 reference, written from the formula in the module docstring, one anchor at a
# time; anchors without a positive are left out (where the reference code gives NaN).


def reference(features, pair_weights, temperature=0.07, base_temperature=0.07):
    f = np.asarray(features, np.float64)
    f = f / np.linalg.norm(f, axis=-1, keepdims=True)
    batch, views, _ = f.shape
    z = [(b, f[b, v]) for v in range(views) for b in range(batch)]
    terms = []
    for i, (bi, zi) in enumerate(z):
        others = [(j, bj, zj) for j, (bj, zj) in enumerate(z) if j != i]
        log_den = np.log(sum(np.exp(zi @ za / temperature) for _, _, za in others))
        weights = [pair_weights[bi, bj] for _, bj, _ in others]
        if sum(weights) == 0:
            continue
        pairs = zip(weights, others, strict=True)
        total = sum(w * (zi @ zp / temperature - log_den) for w, (_, _, zp) in pairs)
        terms.append(total / sum(weights))
    if not terms:
        return 0.0
    return -(temperature / base_temperature) * np.mean(terms)


def cross_reference(images, texts, pair_weights, temperature=0.07, base_temperature=0.07):
    x = np.asarray(images, np.float64)
    y = np.asarray(texts, np.float64)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    y /= np.linalg.norm(y, axis=-1, keepdims=True)

    def direction(a, b, w):
        terms = []
        for i in range(len(a)):
            logits = a[i] @ b.T / temperature
            log_prob = logits - np.log(np.sum(np.exp(logits)))
            if w[i].sum() > 0:
                terms.append(np.sum(w[i] * log_prob) / w[i].sum())
        return np.mean(terms)

    both = direction(x, y, pair_weights) + direction(y, x, pair_weights.T)
    return -(temperature / base_temperature) * both / 2


def _features(seed, batch=6, views=2, dim=5):
    return jax.random.normal(jax.random.key(seed), (batch, views, dim))


def _mask(labels):
    labels = np.asarray(labels)
    return (labels[:, None] == labels[None, :]).astype(np.float64)


@pytest.mark.parametrize(
    "labels,views,temperature,base",
    [
        ([0, 1, 0, 2, 1, 2], 2, 0.07, 0.07),
        ([0, 0, 0, 1, 1, 1], 3, 0.5, 0.07),
        ([3, 1, 3, 3, 1, 3], 1, 0.2, 0.1),
        ([0, 1, 2, 3, 4, 5], 2, 0.1, 0.1),
    ],
)
def test_matches_numpy_reference(labels, views, temperature, base):
    features = _features(0, views=views)
    got = supcon(features, jnp.asarray(labels), temperature=temperature, base_temperature=base)
    want = reference(features, _mask(labels), temperature, base)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_two_views_all_distinct_is_nt_xent():
    temperature = 0.5
    features = _features(1, batch=5, views=2, dim=8)
    z = np.asarray(supcon_lib.l2_normalize(features))
    z = np.concatenate([z[:, 0], z[:, 1]])  # [2B, D]
    n = len(z)
    logits = z @ z.T / temperature
    logits[np.eye(n, dtype=bool)] = -np.inf  # SimCLR drops the self-similarity.
    partner = (np.arange(n) + n // 2) % n
    nt_xent = optax.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(logits), jnp.asarray(partner)
    ).mean()
    got = supcon(features, jnp.arange(5), temperature=temperature, base_temperature=temperature)
    np.testing.assert_allclose(got, nt_xent, rtol=1e-5)


def test_invariant_to_permuting_examples_and_views():
    features = _features(2, batch=8, views=3)
    labels = jnp.array([0, 1, 2, 0, 1, 2, 0, 3])
    base = supcon(features, labels)
    order = jax.random.permutation(jax.random.key(3), 8)
    np.testing.assert_allclose(supcon(features[order], labels[order]), base, rtol=1e-5)
    np.testing.assert_allclose(supcon(features[:, ::-1], labels), base, rtol=1e-5)


def test_invariant_to_feature_scale_after_normalisation():
    features = _features(4)
    labels = jnp.array([0, 1, 0, 1, 2, 2])
    scales = jnp.exp(jax.random.normal(jax.random.key(5), (6, 2, 1)) * 2.0)
    np.testing.assert_allclose(supcon(features * scales, labels), supcon(features, labels), 1e-5)
    # Without normalisation the scale is not divided out: the test above can fail.
    raw = supcon(features * 3.0, labels, normalize=False)
    assert not np.isclose(raw, supcon(features * 3.0, labels))


def test_anchors_without_positive_are_left_out_not_nan():
    features = _features(6, batch=5, views=1)
    labels = jnp.array([0, 0, 1, 2, 2])  # Example 2 has no positive with one view.
    loss, grad = jax.value_and_grad(lambda f: supcon(f, labels))(features)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, reference(features, _mask(labels)), rtol=2e-5)
    # No anchor has a positive: 0, and a zero gradient, not NaN.
    loss, grad = jax.value_and_grad(lambda f: supcon(f, jnp.arange(5)))(features)
    assert loss == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_multi_label_and_mask_forms():
    features = _features(7, batch=5, views=2)
    multi_hot = jnp.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]])
    shared = np.asarray(multi_hot @ multi_hot.T > 0, np.float64)
    got = supcon(features, multi_hot)
    np.testing.assert_allclose(got, reference(features, shared), rtol=2e-5)
    np.testing.assert_allclose(supcon(features, mask=jnp.asarray(shared)), got, rtol=1e-6)
    # A weighted mask weighs each positive's term, as the reference code does.
    weights = np.asarray(jax.random.uniform(jax.random.key(8), (5, 5))) * shared
    np.testing.assert_allclose(
        supcon(features, mask=jnp.asarray(weights)), reference(features, weights), rtol=2e-5
    )
    labels = jnp.array([0, 1, 1, 0, 2])
    np.testing.assert_allclose(
        supcon(features, labels), supcon(features, mask=jnp.asarray(_mask(labels))), rtol=1e-6
    )


def test_gradient_matches_finite_differences():
    """jax.grad against central differences of the float64 reference (h small enough that
    the truncation error is far below float32's rounding of the gradient)."""
    features = _features(9, batch=4, views=2, dim=3)
    labels = [0, 1, 0, 1]
    pair_weights = _mask(labels)
    grad = jax.jit(jax.grad(lambda f: supcon_lib.supcon(f, jnp.asarray(labels), temperature=0.5)))(
        features
    )
    x = np.asarray(features, np.float64)
    for seed in range(3):
        direction = np.asarray(jax.random.normal(jax.random.key(100 + seed), x.shape), np.float64)
        h = 1e-5
        plus = reference(x + h * direction, pair_weights, temperature=0.5)
        minus = reference(x - h * direction, pair_weights, temperature=0.5)
        numeric = (plus - minus) / (2 * h)
        np.testing.assert_allclose(np.vdot(grad, direction), numeric, rtol=1e-4, atol=1e-6)


def test_sharded_batch_gives_the_one_device_value():
    features = _features(10, batch=16, views=2, dim=8)
    labels = jnp.arange(16) % 5
    one = supcon(features, labels)
    one_grad = jax.grad(lambda f: supcon_lib.supcon(f, labels))(features)
    # Auto axes, as the trainer's mesh (`sharding.make_mesh`).
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",), axis_types=(AxisType.Auto,))
    spread = NamedSharding(mesh, P("data"))
    sharded = jax.device_put(features, spread)
    sharded_labels = jax.device_put(labels, spread)
    assert len(sharded.addressable_shards) == 8
    got = supcon(sharded, sharded_labels)
    grad = jax.jit(jax.grad(lambda f, y: supcon_lib.supcon(f, y)))(sharded, sharded_labels)
    np.testing.assert_allclose(got, one, rtol=1e-6)
    np.testing.assert_allclose(grad, one_grad, rtol=1e-5, atol=1e-7)
    assert grad.sharding.is_equivalent_to(spread, grad.ndim)


def test_cross_modal_all_distinct_is_clip_symmetric_infonce():
    temperature = 0.1
    key_i, key_t = jax.random.split(jax.random.key(11))
    images, texts = jax.random.normal(key_i, (6, 4)), jax.random.normal(key_t, (6, 4))
    x, y = supcon_lib.l2_normalize(images), supcon_lib.l2_normalize(texts)
    logits = x @ y.T / temperature
    ce = optax.softmax_cross_entropy_with_integer_labels
    clip = 0.5 * (ce(logits, jnp.arange(6)).mean() + ce(logits.T, jnp.arange(6)).mean())
    got = cross_modal(
        images, texts, jnp.arange(6), temperature=temperature, base_temperature=temperature
    )
    np.testing.assert_allclose(got, clip, rtol=1e-5)
    labels = jnp.array([0, 1, 0, 2, 1, 0])
    np.testing.assert_allclose(
        cross_modal(images, texts, labels), cross_reference(images, texts, _mask(labels)), 2e-5
    )


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda f: supcon_lib.supcon(f, jnp.arange(3), temperature=0.0), "temperature"),
        (lambda f: supcon_lib.supcon(f, jnp.arange(3), base_temperature=-1.0), "base_temp"),
        (lambda f: supcon_lib.supcon(f), "exactly one"),
        (lambda f: supcon_lib.supcon(f, jnp.arange(3), mask=jnp.eye(3)), "exactly one"),
        (lambda f: supcon_lib.supcon(f, jnp.arange(4)), "4 labels"),
        (lambda f: supcon_lib.supcon(f, mask=jnp.eye(4)), "mask must be"),
        (lambda f: supcon_lib.supcon(f[:, 0], jnp.arange(3)), "features must be"),
    ],
)
def test_rejects_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(jnp.ones((3, 2, 4)))
