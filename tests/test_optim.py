import jax.numpy as jnp
import optax
import pytest

from configs import demo
from nsync_jax import optim, projection


def test_nsync_chain_projects_first_and_needs_negatives():
    config = demo.get_config()
    config.optim.clip_norm = 1.0
    tx = optim.make_optimizer(config)
    params = {"w": jnp.ones(4)}
    state = tx.init(params)
    assert isinstance(state[0], projection.NsyncProjectionState)
    g_pos, g_neg = {"w": jnp.array([1.0, 1.0, 0.0, 0.0])}, {"w": jnp.array([1.0, 0.0, 0.0, 0.0])}
    _, state = tx.update(g_pos, state, params, negative_updates=g_neg)
    assert float(optax.tree.get(state, "coefficient")) == pytest.approx(1.0)
    with pytest.raises(TypeError):
        tx.update(g_pos, state, params)


def test_finetune_chain_has_no_projection():
    config = demo.get_config()
    config.train.mode = "finetune"
    tx = optim.make_optimizer(config)
    state = tx.init({"w": jnp.ones(2)})
    assert not any(isinstance(s, projection.NsyncProjectionState) for s in state)
    # Plain AdamW: the first step moves each weight by about lr·sign(g) (+ decay).
    updates, _ = tx.update({"w": jnp.array([2.0, -3.0])}, state, {"w": jnp.zeros(2)})
    assert jnp.allclose(updates["w"], jnp.array([-1e-3, 1e-3]), atol=1e-6)


def test_bad_names():
    config = demo.get_config()
    config.train.mode = "sgd"
    with pytest.raises(ValueError, match="train.mode"):
        optim.make_optimizer(config)
    config = demo.get_config()
    config.optim.schedule = "cosine"
    with pytest.raises(ValueError, match="optim.schedule"):
        optim.make_optimizer(config)
