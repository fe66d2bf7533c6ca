"""The training step under jit: both modes, both scopes, mesh layouts, shared noise."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from nsync_jax import loop, optim, projection, runs, step, train
from nsync_jax import scope as scope_lib


def _config(**train_overrides):
    config = demo.get_config()
    config.train.update(train_overrides)
    return config


class _History(loop.Hook):
    """Every step's metrics, fetched."""

    def __init__(self):
        self.rows = []

    def after_step(self, step, state, metrics):
        self.rows.append(jax.device_get(metrics))


def _run(config, devices, steps):
    trainer = train.setup(config, devices)
    history = _History()
    state = loop.run(trainer, trainer.state, steps, [history])
    return trainer, state, history.rows


def test_fsdp_mesh_matches_single_device():
    config = _config(mode="nsync", scope="unet", batch_size=8)
    # Adam's ε ≫ √v makes the update ≈ lr·m: continuous in the gradient, so float noise in
    # gradients that are 0 in exact arithmetic (biases before a norm) is not amplified to
    # ±lr as plain Adam would, and the comparison below tests the gradients themselves.
    config.optim.update(learning_rate=1.0, eps=1.0, weight_decay=0.0)
    config.mesh.data, config.mesh.fsdp = 2, 4
    mesh_trainer, mesh_state, mesh_hist = _run(config, jax.devices()[:8], 3)
    config.mesh.data, config.mesh.fsdp = 1, 1
    _, one_state, one_hist = _run(config, jax.devices()[:1], 3)

    # Trainable params, both gradients (through their norms) and optimizer state are
    # FSDP-sharded on the mesh: a large kernel is split 4 ways.
    kernel = mesh_state.trainable["conv_in"]["kernel"]
    assert "fsdp" in kernel.sharding.spec
    assert kernel.addressable_shards[0].data.size * 4 == kernel.size
    mu = mesh_state.opt_state[1][0].mu["conv_in"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec

    for a, b in zip(mesh_hist, one_hist, strict=True):
        for key in ("loss_pos", "loss_neg", "cosine"):
            np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
        mesh_state.trainable,
        one_state.trainable,
    )
    assert int(mesh_state.step) == 3 and int(mesh_state.nonfinite_step) == -1
    assert set(mesh_hist[0]) == {
        "loss_pos",
        "loss_neg",
        "grad_norm_pos",
        "grad_norm_neg",
        "update_norm",
        "cosine",
        "coefficient",
    }


def test_textual_inversion_trains_only_the_row_and_finetune_has_no_negatives():
    config = _config(mode="finetune", scope="textual_inversion", batch_size=8)
    trainer, state, history = _run(config, jax.devices()[:8], 2)
    assert set(history[0]) == {"loss_pos", "grad_norm_pos", "update_norm"}
    assert jax.tree.map(jnp.shape, state.trainable) == {"token_embedding": (1, 32)}
    # Optimizer state exists only for the row.
    sizes = [x.size for x in jax.tree.leaves(state.opt_state)]
    assert max(sizes) == 32
    table = state.frozen["text_encoder"]["text_model"]["embeddings"]["token_embedding"]
    assert not np.allclose(state.trainable["token_embedding"][0], table["embedding"][-1])


def _latent_step(config):
    """A jitted step on given latents (no VAE), its initial state, latents and token ids."""
    model, params = runs.build_model(config.model, jax.random.key(0))
    s, model, params = scope_lib.make_scope(config.train, model, params)
    trainable, frozen = s.split(params)
    tx = optim.make_optimizer(config)
    fn = jax.jit(step.make_train_step(model, s, tx, config.train))
    latents = jax.random.normal(jax.random.key(3), (2, *model.latent_shape))
    ids = model.tokenize(["a red circle"] * 2)
    return model, fn, step.init_state(trainable, frozen, tx, jax.random.key(5)), latents, ids


def _identical_branches_loss(share_noise):
    _, fn, state, latents, ids = _latent_step(
        _config(mode="nsync", scope="unet", share_noise=share_noise)
    )
    branch = {"latents": latents, "input_ids": ids}
    _, metrics = fn(state, {"positive": branch, "negative": branch})
    return metrics


def test_share_noise_flag():
    shared = _identical_branches_loss(True)
    assert float(shared["loss_pos"]) == float(shared["loss_neg"])
    assert float(shared["cosine"]) == pytest.approx(1.0, abs=1e-5)
    separate = _identical_branches_loss(False)
    assert float(separate["loss_pos"]) != float(separate["loss_neg"])


def test_nonfinite_loss_is_recorded_with_its_step():
    _, fn, state, good, ids = _latent_step(_config(mode="nsync", scope="unet"))

    def run(state, latents):
        batch = {
            "positive": {"latents": latents, "input_ids": ids},
            "negative": {"latents": good, "input_ids": ids},
        }
        return fn(state, batch)[0]

    state = run(state, good)
    assert int(state.nonfinite_step) == -1
    state = run(state, good.at[0, 0, 0, 0].set(jnp.nan))
    state = run(state, good)
    assert int(state.step) == 3 and int(state.nonfinite_step) == 1


def test_bf16_compute_keeps_fp32_params():
    config = _config(mode="nsync", scope="unet")
    config.model.compute_dtype = "bfloat16"
    model, fn, state, latents, ids = _latent_step(config)
    branch = {"latents": latents, "input_ids": ids}
    state, metrics = fn(state, {"positive": branch, "negative": branch})
    assert all(bool(jnp.isfinite(v)) for v in metrics.values())
    assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype("float32")}
    # The UNet really computes in bf16.
    out = model.predict_noise(state.trainable, latents, jnp.array([1, 2]), jnp.zeros((2, 77, 32)))
    assert out.dtype == jnp.bfloat16


def test_amortized_negatives_reuse_the_carried_gradient():
    config = _config(mode="nsync", scope="textual_inversion", batch_size=4)
    config.data.demo_count = 8
    config.nsync.negative_every = 3
    trainer, state, history = _run(config, jax.devices()[:1], 4)
    losses = [float(h["loss_neg"]) for h in history]
    norms = [float(h["grad_norm_neg"]) for h in history]
    # Step 0 computes g−, steps 1 and 2 reuse it (other batches, same loss and gradient),
    # step 3 computes a fresh one.
    assert losses[0] == losses[1] == losses[2] != losses[3]
    assert norms[0] == norms[1] == norms[2] != norms[3]
    assert jax.tree.structure(state.negative["grad"]) == jax.tree.structure(state.trainable)
    np.testing.assert_allclose(
        float(jnp.linalg.norm(state.negative["grad"]["token_embedding"])), norms[3], rtol=1e-5
    )
    config.nsync.negative_every = 0
    with pytest.raises(ValueError, match="negative_every"):
        train.setup(config, jax.devices()[:1])


def _gradients_setup(mode, batch=4, **kwargs):
    config = _config(mode=mode, scope="unet")
    model, params = runs.build_model(config.model, jax.random.key(0))
    s, model, params = scope_lib.make_scope(config.train, model, params)
    trainable, frozen = s.split(params)
    tx = optim.make_optimizer(config)
    state = step.init_state(trainable, frozen, tx, jax.random.key(5))
    keys = jax.random.split(jax.random.key(3), 2)
    ids = model.tokenize(["a red circle", "a blue square"] * (batch // 2))

    def branch(key):
        return {"latents": jax.random.normal(key, (batch, *model.latent_shape)), "input_ids": ids}

    batch_ = {"positive": branch(keys[0]), "negative": branch(keys[1])}
    return model, s, config, tx, state, batch_


@pytest.mark.parametrize("mode", ["finetune", "nsync"])
def test_grad_accumulation_equals_one_batch(mode):
    model, s, config, tx, state, batch = _gradients_setup(mode)
    rng = jax.random.key(11)
    results = {}
    for k in (1, 2, 4):
        fn = step.make_gradients(model, s, config.train, grad_accum=k)
        if k > 1:  # The micro-batches really are a scan, not k unrolled passes.
            assert "scan" in str(jax.make_jaxpr(fn)(state, batch, rng))
        results[k] = jax.device_get(jax.jit(fn)(state, batch, rng))
    ref_grads, ref_metrics = results[1]
    assert set(ref_grads) == ({"positive", "negative"} if mode == "nsync" else {"positive"})
    for k in (2, 4):
        grads, metrics = results[k]
        for name in ref_metrics:
            np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=2e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads
        )


def test_grad_accumulation_must_split_the_batch_over_the_devices():
    config = _config(mode="finetune", scope="textual_inversion", batch_size=8, grad_accum=2)
    config.data.demo_count = 8
    with pytest.raises(ValueError, match="grad_accum=2 micro-batches"):
        train.setup(config, jax.devices()[:8])


def test_loss_options_apply_to_both_branches():
    model, s, config, tx, state, batch = _gradients_setup("nsync")
    config.train.update(min_snr_gamma=1.0, noise_offset=0.1, timestep_min=100, timestep_max=200)
    rng = jax.random.key(11)
    _, metrics = jax.jit(step.make_gradients(model, s, config.train))(state, batch, rng)

    # The same loss by hand: the options' draws, the plain MSE of each example, weighted.
    schedule = step.diffusion.make_schedule(model.scheduler_config)
    options = step.diffusion.LossOptions(100, 200, noise_offset=0.1, min_snr_gamma=1.0)
    draws_fn = step.make_draws(model, schedule, options)
    forward = jax.jit(step.make_branch_forward(model, s, schedule))  # Unweighted.
    pos_post, pos_noise, neg_post, neg_noise = jax.random.split(rng, 4)
    for name, keys, metric in (
        ("positive", (pos_post, pos_noise), "loss_pos"),
        ("negative", (neg_post, neg_noise), "loss_neg"),
    ):
        draws = draws_fn(batch[name], *keys)
        assert bool(jnp.all((draws["timesteps"] >= 100) & (draws["timesteps"] < 200)))
        out = forward(state.trainable, state.frozen, batch[name], draws)[1]
        errors = jnp.mean(jnp.square(out["prediction"] - out["target"]), axis=(1, 2, 3))
        snr = step.diffusion.snr(schedule, draws["timesteps"])
        weights = jnp.minimum(snr, 1.0) / snr
        assert float(weights.max()) < 0.5  # Low-noise timesteps: the weighting matters here.
        np.testing.assert_allclose(metrics[metric], jnp.mean(weights * errors), rtol=1e-5)


def test_ema_is_the_closed_form_over_steps():
    decay, lr, steps = 0.2, 0.5, 6
    theta0 = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5)}
    g = {"w": jnp.array([0.3, 0.1, -0.2]), "b": jnp.array(1.0)}
    tx = optim.optax.sgd(lr)  # θ_n = θ_0 − n·lr·g exactly (up to float32).
    state = step.init_state(theta0, {}, tx, jax.random.key(0), ema=True)
    apply = jax.jit(step.make_apply(tx, nsync=False, ema_decay=decay))
    for _ in range(steps):
        state, _ = apply(state, {"positive": g}, {})

    # ema_n = Π_{k<n} d_k·θ_0 + Σ_{j=1..n} (1 − d_{j−1})·Π_{j≤k<n} d_k·θ_j, with the
    # warm-up d_t = min(decay, (1 + t)/(10 + t)): 0.1, 0.18, then capped at 0.2.
    d = [min(decay, (1 + t) / (10 + t)) for t in range(steps)]
    assert d[:3] == [0.1, 2 / 11, 0.2]
    for name in theta0:
        theta = [np.float64(theta0[name]) - j * lr * np.float64(g[name]) for j in range(steps + 1)]
        expected = np.prod(d) * theta[0] + sum(
            (1 - d[j - 1]) * np.prod(d[j:]) * theta[j] for j in range(1, steps + 1)
        )
        np.testing.assert_allclose(state.ema[name], expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(state.trainable[name], theta[-1], rtol=1e-6, atol=1e-7)
    assert jax.tree.map(lambda x: x.dtype, state.ema) == jax.tree.map(
        lambda x: x.dtype, state.trainable
    )


def test_without_ema_the_state_has_none_and_saves_none():
    tx = optim.optax.sgd(0.1)
    plain = step.init_state({"w": jnp.ones(3)}, {}, tx, jax.random.key(0))
    assert plain.ema is None
    assert not any("ema" in str(path) for path, _ in jax.tree.flatten_with_path(plain.saved())[0])
    with_ema = step.init_state({"w": jnp.ones(3)}, {}, tx, jax.random.key(0), ema=True)
    grads = {"positive": {"w": jnp.ones(3)}}
    with pytest.raises(ValueError, match="the state has no EMA"):
        step.make_apply(tx, nsync=False, ema_decay=0.9)(plain, grads, {})
    with pytest.raises(ValueError, match="the state has an EMA"):
        step.make_apply(tx, nsync=False)(with_ema, grads, {})
    with pytest.raises(ValueError, match="ema_decay"):
        step.make_apply(tx, nsync=False, ema_decay=1.0)


def _prediction_energy(params, branch, outputs, draws):
    return jnp.mean(jnp.square(outputs["prediction"].astype(jnp.float32)))


@pytest.mark.parametrize("projected", [True, False])
def test_auxiliary_loss_goes_through_the_projection_only_when_asked(projected):
    model, s, config, tx, state, batch = _gradients_setup("nsync", batch=2)
    weight = 0.3
    aux = step.AuxiliaryLoss("energy", weight, _prediction_energy, projected=projected)
    plain = step.make_gradients(model, s, config.train)
    with_aux = step.make_gradients(model, s, config.train, auxiliary=(aux,))
    rng = jax.random.key(11)
    g_plain, m_plain = jax.jit(plain)(state, batch, rng)
    g_aux, m_aux = jax.jit(with_aux)(state, batch, rng)

    # The auxiliary gradient alone, with the same draws as the step's positive branch.
    schedule = step.diffusion.make_schedule(model.scheduler_config)
    forward = step.make_branch_forward(model, s, schedule)
    post_rng, noise_rng, _, _ = jax.random.split(rng, 4)
    draws = step.make_draws(model, schedule)(batch["positive"], post_rng, noise_rng)

    def aux_only(t):
        outputs = forward(t, state.frozen, batch["positive"], draws)[1]
        return weight * _prediction_energy(None, batch["positive"], outputs, {})

    g_alone = jax.jit(jax.grad(aux_only))(state.trainable)
    assert float(m_aux["loss_energy"]) > 0
    np.testing.assert_allclose(m_aux["loss_pos"], m_plain["loss_pos"], rtol=1e-6)
    close = functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=1e-6)
    if projected:
        assert "unprojected" not in g_aux
        jax.tree.map(
            lambda a, p, x: close(a, p + x), g_aux["positive"], g_plain["positive"], g_alone
        )
    else:
        jax.tree.map(close, g_aux["positive"], g_plain["positive"])
        jax.tree.map(close, g_aux["unprojected"], g_alone)
    jax.tree.map(close, g_aux["negative"], g_plain["negative"])
    # The log's two gradients apart: the diffusion loss's and the weighted auxiliary one.
    g_diff = g_plain["positive"]
    norm = optim.optax.tree.norm
    np.testing.assert_allclose(m_aux["grad_norm_diffusion"], norm(g_diff), rtol=2e-4)
    np.testing.assert_allclose(m_aux["grad_norm_aux"], norm(g_alone), rtol=2e-4)
    cosine = optim.optax.tree.vdot(g_diff, g_alone) / (norm(g_diff) * norm(g_alone))
    np.testing.assert_allclose(m_aux["cosine_aux"], cosine, rtol=2e-3, atol=1e-5)

    # What apply hands the optimizer: the unprojected part is added after the projection.
    sgd = optim.optax.chain(projection.nsync_projection(), optim.optax.sgd(1.0))
    sgd_state = state.replace(opt_state=sgd.init(state.trainable))
    new_state, _ = step.make_apply(sgd, nsync=True)(sgd_state, g_aux, m_aux)
    projected_pos, _, _ = projection.project(g_aux["positive"], g_aux["negative"])
    expected = jax.tree.map(lambda p, u: p - u, state.trainable, projected_pos)
    if not projected:
        expected = jax.tree.map(jnp.subtract, expected, g_aux["unprojected"])
    jax.tree.map(close, new_state.trainable, expected)


def test_fp32_master_weights_keep_updates_below_bf16_resolution():
    config = _config(mode="nsync", scope="unet", batch_size=8)
    config.model.compute_dtype = "bfloat16"
    config.model.frozen_dtype = "bfloat16"
    config.optim.learning_rate = 1e-6  # Adam moves each weight by about lr: far below bf16's step.
    trainer = train.setup(config, jax.devices()[:1])
    state = trainer.state
    floats = lambda tree: {x.dtype for x in jax.tree.leaves(tree)}  # noqa: E731
    assert floats(state.trainable) == {jnp.dtype("float32")}
    assert floats(optim.optax.tree.get(state.opt_state, "mu")) == {jnp.dtype("float32")}
    assert floats(state.frozen["text_encoder"]) <= {jnp.dtype("bfloat16"), jnp.dtype("int32")}
    before = jax.device_get(state.trainable)
    state, metrics = trainer.step_fn(state, trainer.batch(0))
    assert np.isfinite(float(metrics["loss_pos"]))
    after = jax.device_get(state.trainable)
    kernel_before = before["conv_in"]["kernel"]
    kernel_after = after["conv_in"]["kernel"]
    moved = kernel_after != kernel_before
    assert moved.mean() > 0.9  # The fp32 master copy takes the tiny update...
    as_bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16))  # noqa: E731
    unchanged_in_bf16 = as_bf16(kernel_after) == as_bf16(kernel_before)
    assert unchanged_in_bf16[moved].mean() > 0.9  # ...which bf16 weights would have lost.
