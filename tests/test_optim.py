import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import demo
from nsync_jax import errors, optim, projection, step


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


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("train.mode", "sgd", "train.mode"),
        ("optim.name", "adam", "optim.name"),
        ("optim.schedule", "exponential", "optim.schedule"),
        ("optim.learning_rate", -1e-3, "optim.learning_rate"),
        ("optim.warmup_steps", -1, "optim.warmup_steps"),
        ("optim.final_lr_fraction", 1.5, "optim.final_lr_fraction"),
        ("optim.final_lr_fraction", 0.1, "no effect with optim.schedule='constant'"),
    ],
)
def test_bad_values_name_the_field(field, value, match):
    config = demo.get_config()
    group, name = field.split(".")
    config[group][name] = value
    with pytest.raises(errors.ConfigError, match=match):
        optim.make_optimizer(config)


def test_decaying_schedules_need_steps_after_the_warm_up():
    config = demo.get_config()
    config.optim.update(schedule="cosine", warmup_steps=config.train.num_steps)
    with pytest.raises(errors.ConfigError, match="leaves none of train.num_steps"):
        optim.check_config(config)
    config.optim.update(schedule="warmup_cosine", warmup_steps=0)
    with pytest.raises(errors.ConfigError, match="needs optim.warmup_steps >= 1"):
        optim.check_config(config)
    config.optim.update(schedule="constant", warmup_steps=config.train.num_steps)
    optim.check_config(config)  # A constant rate may warm up for the whole run.
    config.optim.update(schedule="cosine", warmup_steps=0, learning_rate=0.0)
    optim.check_config(config)  # A rate of 0 trains nothing, but is no mistake.
    assert float(optim.learning_rate(config.optim, 10)(5)) == 0.0


def _schedule(name, warmup=0, final=0.0, lr=1.0, num_steps=100):
    config = demo.get_config().optim
    config.update(learning_rate=lr, schedule=name, warmup_steps=warmup, final_lr_fraction=final)
    fn = optim.learning_rate(config, num_steps)
    return lambda step: float(jax.jit(fn)(jnp.int32(step)))


def test_schedule_values_at_chosen_steps():
    approx = functools.partial(pytest.approx, rel=1e-5, abs=1e-7)
    constant = _schedule("constant", lr=2e-3)
    assert [constant(s) for s in (0, 50, 99, 500)] == [approx(2e-3)] * 4
    warm = _schedule("constant", warmup=10, lr=2e-3)
    assert [warm(s) for s in (0, 5, 10, 99)] == [0.0, approx(1e-3), approx(2e-3), approx(2e-3)]
    # Linear: from the peak at the end of the warm-up to final·peak at num_steps.
    linear = _schedule("linear", warmup=20, final=0.1)
    assert [linear(s) for s in (10, 20, 60, 100, 150)] == [
        approx(0.5),
        approx(1.0),
        approx(1.0 - 0.9 * 40 / 80),
        approx(0.1),
        approx(0.1),
    ]
    # Cosine: final + (peak − final)·(1 + cos(π·k/K))/2, k steps into the K after warm-up.
    cosine = _schedule("cosine", warmup=20, final=0.1)
    for at in (20, 40, 60, 90, 100):
        k = at - 20
        assert cosine(at) == approx(0.1 + 0.9 * (1 + math.cos(math.pi * k / 80)) / 2), at
    assert cosine(10) == approx(0.5) and cosine(1000) == approx(0.1)
    no_warmup = _schedule("cosine")
    assert [no_warmup(s) for s in (0, 50, 100)] == [approx(1.0), approx(0.5), approx(0.0)]
    # warmup_cosine is optax's warmup_cosine_decay_schedule: the same curve as cosine.
    warmup_cosine = _schedule("warmup_cosine", warmup=20, final=0.1)
    for at in (0, 7, 20, 33, 60, 99, 100):
        assert warmup_cosine(at) == approx(cosine(at)), at


def test_the_chain_steps_by_the_schedule():
    config = demo.get_config()
    config.train.mode = "finetune"
    config.train.num_steps = 4
    config.optim.update(name="sgd", b1=0.0, weight_decay=0.0, schedule="linear", warmup_steps=0)
    tx = optim.make_optimizer(config)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    steps = []
    for _ in range(4):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        steps.append(float(-updates["w"]))
    np.testing.assert_allclose(steps, [1e-3, 0.75e-3, 0.5e-3, 0.25e-3], rtol=1e-6)


def test_adafactor_is_optax_adafactor_with_decay_scaled_by_the_learning_rate():
    config = demo.get_config()
    config.train.mode = "finetune"
    config.optim.update(name="adafactor", learning_rate=0.01, weight_decay=0.1)
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.standard_normal((256, 130)), jnp.float32)}
    grads = {"w": jnp.asarray(rng.standard_normal((256, 130)), jnp.float32)}
    ours, reference = (
        optim.make_optimizer(config),
        optax.adafactor(0.01, multiply_by_parameter_scale=False),
    )
    ours_state, ref_state = ours.init(params), reference.init(params)
    for _ in range(3):
        update, ours_state = ours.update(grads, ours_state, params)
        expected, ref_state = reference.update(grads, ref_state, params)
        expected = jax.tree.map(lambda e, p: e - 0.01 * 0.1 * p, expected, params)
        np.testing.assert_allclose(update["w"], expected["w"], rtol=1e-5, atol=1e-8)


def _apply_one_step(name, mode):
    """One `step.make_apply` update with optimizer `name`: (before, after, metrics)."""
    config = demo.get_config()
    config.train.mode = mode
    config.optim.name = name
    tx = optim.make_optimizer(config)
    rng = np.random.default_rng(0)
    trainable = {
        "kernel": jnp.asarray(rng.standard_normal((256, 130)), jnp.float32),  # Factored.
        "bias": jnp.asarray(rng.standard_normal(130), jnp.float32),
    }
    state = step.init_state(trainable, {}, tx, jax.random.key(0))
    grads = {"positive": jax.tree.map(lambda x: jnp.sin(3 * x), trainable)}
    if mode == "nsync":
        grads["negative"] = jax.tree.map(jnp.cos, trainable)
    new_state, metrics = jax.jit(step.make_apply(tx, nsync=mode == "nsync"))(state, grads, {})
    return trainable, new_state, jax.device_get(metrics)


@pytest.mark.parametrize("mode", optim.MODES)
@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_each_optimizer_trains_a_step_in_both_modes(name, mode):
    before, state, metrics = _apply_one_step(name, mode)
    assert int(state.step) == 1 and int(state.nonfinite_step) == -1
    assert all(np.isfinite(v) for v in metrics.values())
    for key in before:
        moved = np.abs(np.asarray(state.trainable[key]) - np.asarray(before[key]))
        assert 0 < moved.max() < 0.1, (key, moved.max())
    if mode == "nsync":  # The projection came first and saw both gradients.
        assert isinstance(state.opt_state[0], projection.NsyncProjectionState)
        assert 0 < abs(float(metrics["coefficient"]))
