"""Tests of nsync_jax.projection: a NumPy reference, edge cases, optax chaining, sharding."""

import itertools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nsync_jax.projection import (
    GRANULARITIES,
    RULES,
    NsyncProjectionState,
    nsync_projection,
    project,
    tree_dot,
)

COMBOS = list(itertools.product(RULES, GRANULARITIES))
BF16 = ml_dtypes.bfloat16

# One jit; jax caches a compilation per (rule, granularity, eps) and per input signature.
project_jit = jax.jit(project, static_argnums=(2, 3, 4))


# --------------------------------------------------------------------------------------------
# NumPy float64 reference, written from the formulas, independent of the module.


def reference(pos, neg, rule, granularity, eps):
    """Returns (u leaves as float64, cosine, coefficient, atol scale of each u leaf, atol for
    coef)."""
    p = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(pos)]
    n = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(neg)]
    shapes = [np.shape(x) for x in jax.tree.leaves(pos)]
    uses_sum = rule in ("v41", "v42")
    d = [pi + ni for pi, ni in zip(p, n, strict=True)] if uses_sum else n

    def coefficient(pv, dv):
        num = float(pv @ dv)
        if rule == "conflicting":
            num = min(num, 0.0)
        den = float(dv @ dv)
        return 0.0 if den == 0.0 else num / (den + eps)

    def ratio(pv, dv):  # |dc| from fp32 rounding in <p, d> is about 1e-7 * |p| / |d|.
        dn = np.linalg.norm(dv)
        return 0.0 if dn == 0.0 else np.linalg.norm(pv) / dn

    p_all, n_all, d_all = (np.concatenate(x) for x in (p, n, d))
    if granularity == "global":
        coefs = [coefficient(p_all, d_all)] * len(p)
        coef = coefs[0]
        ratios = [ratio(p_all, d_all)] * len(p)
    else:
        coefs = [coefficient(pi, di) for pi, di in zip(p, d, strict=True)]
        coef = float(np.mean(coefs))
        ratios = [ratio(pi, di) for pi, di in zip(p, d, strict=True)]
    coef_atol = max(ratios, default=0.0)
    scale = 2.0 if rule == "v42" else 1.0
    u = [(scale * pi - c * di).reshape(s) for pi, di, c, s in zip(p, d, coefs, shapes, strict=True)]
    pn, pp, nn = p_all @ n_all, p_all @ p_all, n_all @ n_all
    cosine = 0.0 if pp == 0 or nn == 0 else pn / np.sqrt(pp * nn)

    # Leaf by leaf, u = s p - c d rounds in float32 like its largest terms, s |p| and
    # |c| |d|, and c itself is off by about 1e-7 |p| / |d| over its group (the tree, or
    # the leaf): that error reaches u in proportion to this leaf's |d|. A whole-tree scale
    # would hide a wrong small leaf beside a large one.
    def biggest(x):
        return float(np.max(np.abs(x), initial=0.0))

    u_scales = [
        scale * biggest(pi) + (abs(c) + r) * biggest(di)
        for pi, di, c, r in zip(p, d, coefs, ratios, strict=True)
    ]
    return u, cosine, coef, u_scales, coef_atol


# Relative tolerance of an output leaf: about one unit in the last place of its dtype.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(BF16): 2.0**-7, np.dtype(np.float16): 2.0**-10}


def assert_matches_reference(pos, neg, rule, granularity, eps, u, cosine, coef):
    ref_u, ref_cos, ref_coef, u_scales, coef_atol = reference(pos, neg, rule, granularity, eps)
    leaves = zip(jax.tree.leaves(u), jax.tree.leaves(pos), ref_u, u_scales, strict=True)
    for leaf, orig, ref, u_scale in leaves:
        assert leaf.dtype == orig.dtype
        assert leaf.shape == orig.shape
        assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
        # Absolute part: float32 rounding in the sums, and the spacing of the output dtype
        # near 0 (float16 cannot hold values under 6e-8).
        atol = 1e-5 * u_scale + float(ml_dtypes.finfo(leaf.dtype).smallest_subnormal)
        np.testing.assert_allclose(
            np.asarray(leaf, np.float64), ref, rtol=RTOL[leaf.dtype], atol=atol
        )
    np.testing.assert_allclose(float(cosine), ref_cos, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(coef), ref_coef, rtol=1e-4, atol=1e-5 * coef_atol)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_reference_check_sees_a_wrong_small_leaf_beside_a_large_one(granularity):
    # Gradients of a large kernel and a small bias: 1 % off in the bias must fail, though
    # it is far below the rounding of the whole tree's norm.
    rng = np.random.default_rng(12)

    def tree():
        return {
            "kernel": (100 * rng.normal(size=(64, 64))).astype(np.float32),
            "bias": (0.01 * rng.normal(size=(3,))).astype(np.float32),
        }

    pos, neg = tree(), tree()
    u, cosine, coef = project_jit(pos, neg, "paper", granularity, 1e-12)
    assert_matches_reference(pos, neg, "paper", granularity, 1e-12, u, cosine, coef)
    wrong = {**u, "bias": u["bias"] * np.float32(1.01)}
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_matches_reference(pos, neg, "paper", granularity, 1e-12, wrong, cosine, coef)


# --------------------------------------------------------------------------------------------
# Random trees of 1-4 leaves, mixed dtypes, with negatives related to the positives in the
# ways that hit the guards: unrelated, zero, exactly opposite (s = 0), parallel.


def _leaf_values(draw, shape):
    if draw(st.booleans()):
        x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-8, 8, width=32)))
    else:  # Dense values of a random scale: what gradients look like.
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        x = rng.normal(size=shape) * draw(st.sampled_from([1e-3, 1.0, 30.0]))
    # Values so small that their squares underflow float32 would make the float64 reference
    # see a nonzero norm where float32 sees 0; they say nothing about the projection.
    return np.where(np.abs(x) < 1e-6, 0.0, x).astype(np.float32)


@st.composite
def tree_pairs(draw):
    relation = draw(st.sampled_from(["random", "random", "zero", "opposite", "parallel"]))
    factor = draw(st.sampled_from([-3.0, -0.5, 0.25, 2.0]))
    pos, neg = {}, {}
    for i in range(draw(st.integers(1, 4))):
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=5))
        dtype = draw(st.sampled_from([np.float32, BF16, np.float16]))
        p = _leaf_values(draw, shape).astype(dtype)
        if relation == "random":
            n = _leaf_values(draw, shape).astype(dtype)
        elif relation == "zero":
            n = np.zeros(shape, dtype)
        elif relation == "opposite":
            n = -p
        else:
            n = (p.astype(np.float32) * factor).astype(dtype)
        pos[f"leaf{i}"], neg[f"leaf{i}"] = p, n
    return pos, neg


@pytest.mark.parametrize("rule,granularity", COMBOS)
@settings(max_examples=20, deadline=None)
@given(trees=tree_pairs(), eps=st.sampled_from([0.0, 1e-12, 1e-3]))
def test_matches_numpy_reference(rule, granularity, trees, eps):
    pos, neg = trees
    u, cosine, coef = project_jit(pos, neg, rule, granularity, eps)
    assert_matches_reference(pos, neg, rule, granularity, eps, u, cosine, coef)


# --------------------------------------------------------------------------------------------
# Properties and edge cases.


def random_tree(seed, dtypes=(np.float32, np.float32, np.float32)):
    rng = np.random.default_rng(seed)
    shapes = [(7, 5), (3, 2, 4), (11,)]
    return {
        f"w{i}": rng.normal(size=s).astype(dt)
        for i, (s, dt) in enumerate(zip(shapes, dtypes, strict=True))
    }


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("seed", range(3))
def test_paper_update_is_orthogonal_to_negative(granularity, seed):
    pos, neg = random_tree(seed), random_tree(seed + 100)
    u, _, _ = project_jit(pos, neg, "paper", granularity, 1e-12)
    # Global: orthogonal over the whole tree. Per tensor: orthogonal leaf by leaf.
    groups = [list(pos)] if granularity == "global" else [[k] for k in pos]
    for keys in groups:
        u_k, pos_k, neg_k = ({k: t[k] for k in keys} for t in (u, pos, neg))
        dot_un = float(tree_dot(u_k, neg_k))
        norms = np.sqrt(float(tree_dot(pos_k, pos_k)) * float(tree_dot(neg_k, neg_k)))
        assert abs(dot_un) <= 1e-6 * norms


@pytest.mark.parametrize("rule", ["paper", "conflicting"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("eps", [0.0, 1e-12])
def test_zero_negative_returns_positive_exactly(rule, granularity, eps):
    pos = random_tree(0, dtypes=(np.float32, BF16, np.float16))
    neg = jax.tree.map(np.zeros_like, pos)
    u, cosine, coef = project_jit(pos, neg, rule, granularity, eps)
    for k in pos:
        np.testing.assert_array_equal(np.asarray(u[k]), pos[k])
    assert float(cosine) == 0.0 and float(coef) == 0.0


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_sum_rules_with_zero_sum(granularity):
    pos = random_tree(1, dtypes=(np.float32, BF16, np.float32))
    neg = jax.tree.map(np.negative, pos)  # s = g+ + g- = 0
    u41, _, c41 = project_jit(pos, neg, "v41", granularity, 0.0)
    u42, _, c42 = project_jit(pos, neg, "v42", granularity, 0.0)
    for k in pos:
        np.testing.assert_array_equal(np.asarray(u41[k]), pos[k])
        np.testing.assert_array_equal(np.asarray(u42[k]), 2 * pos[k])
    assert float(c41) == 0.0 and float(c42) == 0.0


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gradient_is_finite_at_zero_norm(rule, granularity):
    pos = random_tree(2)
    neg = (
        jax.tree.map(np.zeros_like, pos)
        if rule in ("paper", "conflicting")
        else (jax.tree.map(np.negative, pos))
    )

    def loss(p, n):
        u, cosine, coef = project(p, n, rule, granularity, 0.0)
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(u)) + cosine + coef

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(pos, neg)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_conflicting_only_projects_conflicts(granularity):
    pos = random_tree(3, dtypes=(np.float32, BF16, np.float16))
    aligned = jax.tree.map(lambda x: (np.asarray(x, np.float32) * 0.5 + 0.1).astype(x.dtype), pos)
    assert all(float(tree_dot(pos[k], aligned[k])) > 0 for k in pos)
    u, _, coef = project_jit(pos, aligned, "conflicting", granularity, 1e-12)
    for k in pos:  # bit for bit: no round trip through float32 arithmetic shows.
        assert u[k].dtype == pos[k].dtype
        np.testing.assert_array_equal(np.asarray(u[k]), pos[k])
    assert float(coef) == 0.0

    opposed = jax.tree.map(np.negative, aligned)
    u, _, coef = project_jit(pos, opposed, "conflicting", granularity, 1e-12)
    u_paper, _, coef_paper = project_jit(pos, opposed, "paper", granularity, 1e-12)
    assert float(coef) < 0.0 and float(coef) == float(coef_paper)
    for k in pos:
        assert not np.array_equal(np.asarray(u[k]), pos[k])
        np.testing.assert_array_equal(np.asarray(u[k]), np.asarray(u_paper[k]))


def test_conflicting_tests_the_sign_at_its_granularity():
    # Leaf a agrees (<p, n> = 3), leaf b conflicts (<p, n> = -1); over the tree they agree.
    pos = {"a": np.array([3.0], np.float32), "b": np.array([1.0, 2.0], np.float32)}
    neg = {"a": np.array([1.0], np.float32), "b": np.array([-1.0, 0.0], np.float32)}
    u, _, coef = project_jit(pos, neg, "conflicting", "global", 0.0)
    for k in pos:
        np.testing.assert_array_equal(np.asarray(u[k]), pos[k])
    assert float(coef) == 0.0
    u, _, coef = project_jit(pos, neg, "conflicting", "per_tensor", 0.0)
    np.testing.assert_array_equal(np.asarray(u["a"]), pos["a"])
    np.testing.assert_allclose(np.asarray(u["b"]), [0.0, 2.0])
    np.testing.assert_allclose(float(coef), (0.0 + -1.0) / 2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rule": "pcgrad"},
        {"rule": "PAPER"},
        {"granularity": "per_leaf"},
        {"eps": -1e-12},
        {"eps": float("nan")},
        {"eps": float("inf")},
    ],
)
def test_bad_hyperparameters_raise(kwargs):
    with pytest.raises(ValueError):
        nsync_projection(**kwargs)
    tree = {"w": np.ones(3, np.float32)}
    with pytest.raises(ValueError):
        project(tree, tree, **kwargs)


def test_mismatched_trees_raise():
    with pytest.raises(ValueError, match="tree structure"):
        project({"a": np.ones(2)}, {"b": np.ones(2)})


def test_dtype_and_state():
    pos = random_tree(4, dtypes=(BF16, np.float32, np.float16))
    neg = random_tree(5, dtypes=(BF16, np.float32, np.float16))
    for rule, granularity in COMBOS:
        tx = nsync_projection(rule, granularity)
        state = tx.init(pos)
        assert isinstance(state, NsyncProjectionState)
        assert state.cosine.dtype == state.coefficient.dtype == jnp.float32
        assert state.cosine.shape == state.coefficient.shape == ()
        assert float(state.cosine) == float(state.coefficient) == 0.0

        u, state = jax.jit(lambda g, s, n, tx=tx: tx.update(g, s, negative_updates=n))(
            pos, state, neg
        )
        assert {k: v.dtype for k, v in u.items()} == {k: v.dtype for k, v in pos.items()}
        assert state.cosine.dtype == state.coefficient.dtype == jnp.float32
        assert_matches_reference(
            pos, neg, rule, granularity, 1e-12, u, state.cosine, state.coefficient
        )


def test_per_tensor_coefficient_is_mean_and_cosine_is_global():
    # Leaf a: <p, n> = 1, |n|^2 = 2 -> c = 1/2. Leaf b: <p, n> = -2, |n|^2 = 1 -> c = -2.
    # The cosine is over the whole tree: <p, n> = -1, |p|^2 = 5, |n|^2 = 3.
    pos = {"a": np.array([1.0, 0.0], np.float32), "b": np.array([2.0], np.float32)}
    neg = {"a": np.array([1.0, 1.0], np.float32), "b": np.array([-1.0], np.float32)}
    _, cosine, coef = project_jit(pos, neg, "paper", "per_tensor", 0.0)
    np.testing.assert_allclose(float(coef), (0.5 + -2.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(cosine), (1.0 - 2.0) / np.sqrt(5.0 * 3.0), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Composition with optax.


def test_chain_with_clipping_and_adamw():
    params = random_tree(6)
    g_pos, g_neg = random_tree(7), random_tree(8)
    tx = optax.chain(
        nsync_projection(), optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=1e-2)
    )
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, g_pos, g_neg):
        updates, opt_state = tx.update(g_pos, opt_state, params, negative_updates=g_neg)
        return optax.apply_updates(params, updates), opt_state

    new_params, new_state = step(params, opt_state, g_pos, g_neg)

    # The same step by hand: project, then an ordinary clip + adamw chain.
    u, cosine, coef = project(g_pos, g_neg)
    rest = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=1e-2))
    expected_updates, _ = rest.update(u, rest.init(params), params)
    expected = optax.apply_updates(params, expected_updates)
    for k in params:
        np.testing.assert_allclose(new_params[k], expected[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(new_state[0].cosine, cosine, rtol=1e-6)
    np.testing.assert_allclose(new_state[0].coefficient, coef, rtol=1e-6)


def test_missing_negative_updates_raises():
    params = random_tree(6)
    tx = nsync_projection()
    with pytest.raises(TypeError, match="negative_updates"):
        tx.update(params, tx.init(params), params)
    chained = optax.chain(tx, optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    with pytest.raises(TypeError, match="negative_updates"):
        chained.update(params, chained.init(params), params)


# --------------------------------------------------------------------------------------------
# Sharding: on a 2x4 mesh with FSDP-sharded leaves, only scalars cross devices.

_COLLECTIVE = re.compile(
    r"=\s+(\([^)]*\)|\S+)\s+"
    r"(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter|collective-broadcast)"
    r"(?:-start)?\("
)


def collectives(hlo_text):
    """Returns [(op, [dims of each result array])] for the collectives in compiled HLO."""
    found = []
    for shape, op in _COLLECTIVE.findall(hlo_text):
        dims = re.findall(r"[a-z]\w*\[([^\]]*)\]", shape)
        found.append((op, dims))
    return found


def assert_only_scalar_all_reduces(hlo_text):
    found = collectives(hlo_text)
    assert found, "expected at least one all-reduce of the partial dot products"
    for op, dims in found:
        assert op == "all-reduce", f"{op} in compiled HLO: {found}"
        assert dims and all(d == "" for d in dims), f"non-scalar all-reduce: {found}"


@pytest.fixture(scope="module")
def mesh():
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    return jax.sharding.Mesh(
        devices, ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )


SPECS = {"w": P("fsdp", None), "k": P(None, None, None, "fsdp"), "b": P()}
SHAPES = {"w": (64, 32), "k": (3, 3, 8, 16), "b": (16,)}
DTYPES = {"w": np.float32, "k": BF16, "b": np.float32}


def sharded_inputs(mesh):
    rng = np.random.default_rng(9)
    pos = {k: rng.normal(size=SHAPES[k]).astype(DTYPES[k]) for k in SHAPES}
    neg = {k: rng.normal(size=SHAPES[k]).astype(DTYPES[k]) for k in SHAPES}
    shardings = {k: NamedSharding(mesh, SPECS[k]) for k in SHAPES}
    return pos, neg, shardings


@pytest.mark.parametrize("rule,granularity", COMBOS)
def test_sharded_update_matches_and_stays_sharded(mesh, rule, granularity):
    pos, neg, shardings = sharded_inputs(mesh)
    replicated = NamedSharding(mesh, P())
    tx = nsync_projection(rule, granularity)
    state = tx.init(pos)

    def update(g_pos, g_neg, state):
        return tx.update(g_pos, state, negative_updates=g_neg)

    state_shardings = jax.tree.map(lambda _: replicated, state)
    jitted = jax.jit(
        update,
        in_shardings=(shardings, shardings, state_shardings),
        out_shardings=(shardings, state_shardings),
    )
    args = (jax.device_put(pos, shardings), jax.device_put(neg, shardings), state)
    u, new_state = jitted(*args)
    u_single, state_single = jax.jit(update)(pos, neg, state)

    for k in SHAPES:
        assert u[k].dtype == pos[k].dtype
        assert u[k].sharding.is_equivalent_to(shardings[k], len(SHAPES[k]))
        # Only the order of the float32 sums differs (per shard, then across shards): the
        # coefficient moves by ~1e-6 relative, leaves of size ~1 by a few 1e-6, and a bf16
        # leaf can round the other way (one unit in the last place).
        np.testing.assert_allclose(
            np.asarray(u[k], np.float32),
            np.asarray(u_single[k], np.float32),
            rtol=RTOL[u[k].dtype] if u[k].dtype != np.float32 else 0,
            atol=1e-5,
        )
    np.testing.assert_allclose(new_state.cosine, state_single.cosine, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new_state.coefficient, state_single.coefficient, rtol=1e-5)
    assert_only_scalar_all_reduces(jitted.lower(*args).compile().as_text())


def test_sharding_propagates_without_out_shardings(mesh):
    pos, neg, shardings = sharded_inputs(mesh)
    jitted = jax.jit(lambda p, n: project(p, n, "v42"), in_shardings=(shardings, shardings))
    u, _, _ = jitted(pos, neg)
    for k in SHAPES:
        assert u[k].sharding.is_equivalent_to(shardings[k], len(SHAPES[k]))
    assert_only_scalar_all_reduces(jitted.lower(pos, neg).compile().as_text())


def test_hlo_checker_catches_gathers(mesh):
    pos, neg, shardings = sharded_inputs(mesh)
    replicated = NamedSharding(mesh, P())

    # The projection, but asked to return replicated leaves: they must be gathered.
    gathered = jax.jit(
        lambda p, n: project(p, n)[0],
        in_shardings=(shardings, shardings),
        out_shardings=replicated,
    )
    with pytest.raises(AssertionError, match="all-gather|non-scalar"):
        assert_only_scalar_all_reduces(gathered.lower(pos, neg).compile().as_text())

    # A dot product over the raveled, concatenated tree, as a naive port would write it.
    def flatten(tree):
        return jnp.concatenate([jnp.ravel(x.astype(jnp.float32)) for x in jax.tree.leaves(tree)])

    def flat_dot(p, n):
        return jnp.vdot(flatten(p), flatten(n))

    flat = jax.jit(flat_dot, in_shardings=(shardings, shardings))
    with pytest.raises(AssertionError, match="all-gather|non-scalar"):
        assert_only_scalar_all_reduces(flat.lower(pos, neg).compile().as_text())


def test_whole_chain_only_reduces_scalars(mesh):
    """projection -> clip_by_global_norm -> adamw on FSDP leaves: still only scalars move."""
    params, g_neg, shardings = sharded_inputs(mesh)
    params = jax.device_put(jax.tree.map(lambda x: x.astype(np.float32), params), shardings)
    tx = optax.chain(nsync_projection(), optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    # out_shardings are needed: no init output depends on the parameters' values (zeros_like
    # included), so without them jit(tx.init) puts all of it, mu and nu too, on device 0.
    replicated = NamedSharding(mesh, P())
    by_shape = {SHAPES[k]: shardings[k] for k in SHAPES}
    state_shardings = jax.tree.map(
        lambda x: by_shape[x.shape] if x.ndim else replicated, jax.eval_shape(tx.init, params)
    )
    opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)

    def step(params, opt_state, g_pos, g_neg):
        updates, opt_state = tx.update(g_pos, opt_state, params, negative_updates=g_neg)
        return optax.apply_updates(params, updates), opt_state

    jitted = jax.jit(
        step,
        in_shardings=(shardings, state_shardings, shardings, shardings),
        out_shardings=(shardings, state_shardings),
    )
    g_neg = jax.device_put(g_neg, shardings)
    assert_only_scalar_all_reduces(
        jitted.lower(params, opt_state, params, g_neg).compile().as_text()
    )
