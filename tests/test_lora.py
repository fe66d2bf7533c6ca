"""LoRA adapters (`lora.py`) and the `lora` / `lora_ti` scopes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from configs import demo
from nsync_jax import lora, optim
from nsync_jax import scope as scope_lib
from nsync_jax import step as step_lib
from nsync_jax.models import layers


def _config(scope="lora", **lora_fields):
    config = demo.get_config()
    config.train.scope = scope
    for name, value in lora_fields.items():
        config.lora[name] = value
    return config


def _names(adapters):
    layers = flatten_dict(adapters, is_leaf=lambda _, v: lora.A_NAME in v)
    return sorted(lora.module_name(path) for path in layers)


def test_default_targets_are_the_attention_projections(tiny_sd):
    model, params = tiny_sd
    config = _config()
    s, _, params = scope_lib.make_scope(config.train, model, params, config.lora)
    trainable, frozen = s.split(params)
    assert set(trainable) == {"lora"} and set(trainable["lora"]) == {"unet"}
    names = _names(trainable["lora"]["unet"])
    # Tiny UNet: 4 transformer blocks x 2 attentions x (q, k, v, out).
    assert len(names) == 32
    assert {n.rsplit(".", 1)[-1] for n in names} == {"to_q", "to_k", "to_v", "0"}
    assert all(".attn1." in n or ".attn2." in n for n in names)
    layer = trainable["lora"]["unet"]["mid_block"]["attentions_0"]["transformer_blocks_0"]
    a, b = layer["attn2"]["to_k"][lora.A_NAME], layer["attn2"]["to_k"][lora.B_NAME]
    assert a.shape == (32, 8) and b.shape == (8, 64)  # [in, r], [r, out]
    assert a.dtype == b.dtype == jnp.float32
    assert float(jnp.abs(a).sum()) > 0 and not np.any(b)  # A random, B zero.
    assert jax.tree.structure(frozen) == jax.tree.structure(params)  # The whole base.


def test_target_groups_and_text_encoder(tiny_sd):
    model, params = tiny_sd
    settings = lora.LoraSettings(
        rank=2,
        alpha=2.0,
        targets={
            "unet": lora.expand_targets("proj, ff,resnet"),
            "text_encoder": lora.expand_targets("text_attention"),
        },
    )
    adapters = lora.init_adapters(params, settings, 0)
    unet = _names(adapters["unet"])
    assert "down_blocks.1.resnets.0.conv_shortcut" in unet
    assert "mid_block.attentions.0.proj_in" in unet
    assert "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj" in unet
    assert not any("to_q" in n for n in unet)
    conv = adapters["unet"]["down_blocks_0"]["resnets_0"]["conv1"]
    assert conv[lora.A_NAME].shape == (3, 3, 32, 2) and conv[lora.B_NAME].shape == (2, 32)
    text = _names(adapters["text_encoder"])
    assert len(text) == 8 and "text_model.encoder.layers.1.self_attn.out_proj" in text


def test_bad_settings_are_errors(tiny_sd):
    _, params = tiny_sd
    with pytest.raises(ValueError, match=r"\['to_qq'\] match no"):
        lora.find_targets(params["unet"], ("to_q", "to_qq"))
    with pytest.raises(ValueError, match="lora.rank"):
        lora.LoraSettings.from_config(_config(rank=0).lora)
    with pytest.raises(ValueError, match="lora.implementation"):
        lora.LoraSettings.from_config(_config(implementation="fused").lora)
    with pytest.raises(ValueError, match="both empty"):
        lora.LoraSettings.from_config(_config(unet_targets="").lora)
    config = _config()
    with pytest.raises(ValueError, match="needs the `lora` config group"):
        scope_lib.make_scope(config.train, *tiny_sd)


def _assert_close(actual, expected, tol=1e-4):
    """Trees equal up to float32 reassociation, relative to the largest entry of all."""
    a, b = jax.tree.leaves(actual), jax.tree.leaves(expected)
    scale = max(float(np.abs(x).max()) for x in b)
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))
    assert scale > 0 and diff <= tol * scale, (diff, scale)


def _perturb(tree, seed):
    """As if trained: B nonzero, A moved, no two entries alike."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype), tree)


class _Layers(nn.Module):
    """A Dense and two Convs with stride and padding, as the UNet has them (our layers,
    which add attached adapters times `lora_scale`)."""

    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        scale = self.lora_scale
        x = layers.Conv(8, (3, 3), strides=(2, 2), lora_scale=scale, name="conv1")(x)
        x = layers.Conv(6, (1, 1), padding="VALID", lora_scale=scale, name="proj_in")(
            jax.nn.silu(x)
        )
        return layers.Dense(5, lora_scale=scale, name="to_q")(x)


def test_merge_and_intercept_agree_in_values_and_gradients():
    module = _Layers()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    params = {"net": module.init(jax.random.key(1), x)["params"]}
    settings = lora.LoraSettings(rank=3, alpha=6.0, targets={"unet": ("conv1", "proj_in", "to_q")})
    adapters = lora.init_adapters({"unet": params["net"]}, settings, 2)
    adapters = {"net": _perturb(adapters["unet"], 3)}  # B nonzero.

    def loss(adapters, implementation):
        if implementation == "merge":
            p = lora.merge_component(params["net"], adapters["net"], settings.scale)
            return jnp.sum(jnp.sin(module.apply({"params": p}, x)))
        p = lora.attach_component(params["net"], adapters["net"])
        scaled = module.clone(lora_scale=settings.scale)
        return jnp.sum(jnp.sin(scaled.apply({"params": p}, x)))

    value_m, grad_m = jax.jit(jax.value_and_grad(loss), static_argnums=1)(adapters, "merge")
    value_i, grad_i = jax.jit(jax.value_and_grad(loss), static_argnums=1)(adapters, "intercept")
    base = jnp.sum(jnp.sin(module.apply({"params": params["net"]}, x)))
    assert abs(float(value_m - base)) > 1e-2  # The adapters do something.
    np.testing.assert_allclose(value_i, value_m, rtol=1e-4)
    _assert_close(grad_i, grad_m)
    # And the merged kernel is W + scale * A B in Flax layout.
    merged = lora.merge_component(params["net"], adapters["net"], settings.scale)
    layer = adapters["net"]["to_q"]
    expected = params["net"]["to_q"]["kernel"] + 2.0 * layer[lora.A_NAME] @ layer[lora.B_NAME]
    np.testing.assert_allclose(merged["to_q"]["kernel"], expected, rtol=1e-6, atol=1e-6)


def test_zero_b_merges_to_the_base_and_base_dtype_applies(tiny_sd):
    model, params = tiny_sd
    config = _config(base_dtype="bfloat16", text_targets="text_attention")
    s, _, params = scope_lib.make_scope(config.train, model, params, config.lora)
    trainable, frozen = s.split(params)
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
    merged = s.merged_params(trainable, frozen)
    path = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q", "kernel")
    kernel = merged["unet"]
    for key in path:
        kernel = kernel[key]
    assert kernel.dtype == jnp.float32  # W' in the adapters' dtype.
    jax.tree.map(
        lambda m, f: np.testing.assert_array_equal(np.float32(m), np.float32(f)), merged, frozen
    )


def test_lora_ti_trains_adapters_and_the_token(tiny_sd):
    model, params = tiny_sd
    config = _config("lora_ti", base_dtype="bfloat16")
    s, ti_model, ti_params = scope_lib.make_scope(config.train, model, params, config.lora)
    assert s.name == "lora_ti" and s.token_id == len(model.tokenizer)
    trainable, frozen = s.split(ti_params)
    assert set(trainable) == {"lora", "token_embedding"}
    row = trainable["token_embedding"] + 0.25  # A float32 step a bf16 table would round.
    merged = s.merge({**trainable, "token_embedding": row}, frozen)
    table = merged["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    np.testing.assert_array_equal(table[s.token_id], row[0])


def test_nsync_step_updates_only_the_adapters(tiny_sd):
    """The real step, through the intercepting model (merge is checked against it above)."""
    model, params = tiny_sd
    config = _config("lora", implementation="intercept", unet_targets="attention,proj")
    config.train.mode = "nsync"
    s, model, params = scope_lib.make_scope(config.train, model, params, config.lora)
    assert (
        model.unet.lora_scale
        == model.text_encoder.lora_scale
        == config.lora.alpha / config.lora.rank
    )
    trainable, frozen = s.split(params)
    tx = optim.make_optimizer(config)
    state = step_lib.init_state(trainable, frozen, tx, jax.random.key(0))
    # Optimizer state exists for the adapters only.
    mu = optax.tree.get(state.opt_state, "mu")
    assert jax.tree.structure(mu) == jax.tree.structure(trainable)
    rng = np.random.default_rng(0)
    ids = model.tokenize(["a red circle in the style of painting"] * 2)

    def branch():
        latents = rng.standard_normal((2, *model.latent_shape)).astype(np.float32)
        return {"latents": latents, "input_ids": ids}

    batch = {"positive": branch(), "negative": branch()}
    step = jax.jit(step_lib.make_train_step(model, s, tx, config.train))
    new_state, metrics = step(state, batch)
    metrics = jax.device_get(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    assert metrics["grad_norm_pos"] > 0 and metrics["grad_norm_neg"] > 0
    assert -1.0 <= metrics["cosine"] <= 1.0
    jax.tree.map(np.testing.assert_array_equal, new_state.frozen, state.frozen)
    # B starts at zero, so A's first gradient is zero and only B moves on step one.
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), new_state.trainable, trainable)
    flat = flatten_dict(moved["lora"]["unet"])
    assert all(flat[p] for p in flat if p[-1] == lora.B_NAME)


@pytest.mark.slow
def test_merge_and_intercept_agree_on_the_unet_and_text_encoder(tiny_sd):
    """Both implementations on every target group of the tiny UNet and CLIP (~3e-6)."""
    model, params = tiny_sd
    results = {}
    for implementation in lora.IMPLEMENTATIONS:
        config = _config(
            implementation=implementation,
            unet_targets="attention,proj,ff,resnet",
            text_targets="text_attention",
        )
        s, m, p = scope_lib.make_scope(config.train, model, params, config.lora)
        trainable, frozen = s.split(p)
        trainable = _perturb(trainable, 3)
        ids = m.tokenize(["a red circle"] * 2)
        latents = jax.random.normal(jax.random.key(2), (2, *m.latent_shape))

        def loss(t, s=s, m=m, frozen=frozen, ids=ids, latents=latents):
            merged = s.merge(t, frozen)
            context = m.encode_text(merged["text_encoder"], ids)
            out = m.predict_noise(merged["unet"], latents, jnp.array([3, 500]), context)
            return jnp.mean(out**2)

        results[implementation] = jax.jit(jax.value_and_grad(loss))(trainable)
    (v_m, g_m), (v_i, g_i) = results["merge"], results["intercept"]
    np.testing.assert_allclose(v_i, v_m, rtol=1e-5)
    _assert_close(g_i, g_m)


def test_monet_lora_config_is_valid():
    from configs import monet_lora
    from nsync_jax import train

    config = monet_lora.get_config()
    train.validate_config(config)
    settings = lora.LoraSettings.from_config(config.lora)
    assert settings.targets["unet"] == ("to_q", "to_k", "to_v", "to_out.0")
    assert settings.scale == 1.0 and config.optim.learning_rate == 1e-4


@pytest.mark.slow
def test_pivotal_run_on_an_fsdp_mesh(tmp_path):
    """The loop end to end: lora_ti, intercept, bf16 base, data 2 x fsdp 4."""
    from nsync_jax import train

    config = _config("lora_ti", implementation="intercept", base_dtype="bfloat16")
    config.lora.unet_targets, config.lora.text_targets = "attention,resnet", "text_attention"
    config.optim.learning_rate = 1e-2
    config.train.num_steps, config.log.every = 3, 3
    config.mesh.data, config.mesh.fsdp = 2, 4
    state = train.train(config, str(tmp_path))
    assert int(state.step) == 3 and int(state.nonfinite_step) == -1
    assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {jnp.dtype(jnp.bfloat16)}
    b = state.trainable["lora"]["unet"]["mid_block"]["resnets_0"]["conv1"][lora.B_NAME]
    assert float(jnp.abs(b).max()) > 0
