"""The UNet's attention kernels and remat (`unet_memory.py`, module fields of our UNet):
same outputs, same gradients, same parameters as the plain `xla` call, and remat really in
the program.

Numerics run on a one-level tiny UNet (a down, a mid and an up block; the mid block holds
self- and cross-attention) to keep each compile short; the program and parameter-tree
checks trace the two-level demo UNet, which has all five block classes.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from configs import demo
from nsync_jax import errors, lora, models, unet_memory, weights
from nsync_jax.models import layers

POLICY = "dots_with_no_batch_dims_saveable"
# fp32 on CPU: reordered sums (dot_product's fused softmax, chunked's online softmax) move
# results by a few ulps of the largest value; remat recomputes the same ops.
KERNEL_TOL = 1e-5
REMAT_TOL = 1e-6


def small_config(**options):
    config = demo.get_config().model
    config.resolution = 8
    config.tiny.unet_channels = (32,)
    config.tiny.vae_channels = (32,)
    for name, value in options.items():
        config[name] = value
    return config


def with_memory(model, **options):
    """`model` with other memory options (the UNet rebuilt with their fields)."""
    memory = unet_memory.MemoryOptions(**options)
    unet = model.unet.clone(**memory.unet_attributes())
    return dataclasses.replace(model, unet=unet, memory=memory)


def two_level_unet(model):
    """The demo config's UNet shape: every block kind the UNet builds."""
    config = dataclasses.replace(
        model.unet.config,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    return model.unet.clone(config=config)


def random_like(shapes, seed):
    """Random values in every parameter, norms included, so no zero init hides a difference.

    Drawn by NumPy: a jitted fill of ~100 shapes takes longer to compile than a UNet."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype), shapes)


@pytest.fixture(scope="module")
def small():
    """The one-level tiny model `build_tiny` makes from a config with non-default options,
    random UNet parameters, inputs, and a weight that makes the loss a sum over outputs.

    `build_tiny` is traced, not run: the model is real and only parameter shapes come out
    (compiling the init would cost more than any test here). The other option settings
    are this model with `memory` replaced."""
    config = small_config(attention="chunked", remat="blocks", remat_policy=POLICY)
    built = {}

    def build(rng):
        built["model"], params = models.build_tiny(config, rng)
        return params["unet"]

    unet_params = random_like(jax.eval_shape(build, jax.random.key(0)), seed=1)
    model = built["model"]
    keys = jax.random.split(jax.random.key(2), 3)
    inputs = (
        jax.random.normal(keys[0], (2, *model.latent_shape)),
        jnp.array([3, 700]),
        jax.random.normal(keys[1], (2, 77, 32)),
    )
    weight = jax.random.normal(keys[2], (2, *model.latent_shape))
    return model, unet_params, inputs, weight


def output_and_grad(model, unet_params, inputs, weight):
    def loss(p, inputs, weight):
        out = model.predict_noise(p, *inputs)
        return jnp.sum(out * weight), out

    # Inputs are arguments, not constants folded into the program (and its cache key).
    (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(unet_params, inputs, weight)
    return out, grad


@pytest.fixture(scope="module")
def reference(small):
    model, *rest = small
    return output_and_grad(with_memory(model), *rest)


def assert_trees_close(actual, expected, tol):
    """Every leaf within `tol` times the largest magnitude in `expected` (gradients of
    tiny leaves are not compared to their own near-zero scale)."""
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(expected))
    assert scale > 0
    a, e = flatten_dict(actual), flatten_dict(expected)
    assert a.keys() == e.keys()
    worst = max((float(jnp.abs(a[k] - e[k]).max()), "/".join(k)) for k in e)
    assert worst[0] <= tol * scale, f"{worst[1]} differs by {worst[0]:.3g} (scale {scale:.3g})"


def test_build_tiny_takes_the_options(small):
    model = small[0]
    assert model.memory == unet_memory.MemoryOptions("chunked", "blocks", POLICY)
    assert (model.unet.attention, model.unet.remat, model.unet.remat_policy) == (
        "chunked",
        "blocks",
        POLICY,
    )


@pytest.mark.parametrize("attention", ["dot_product", "chunked"])
def test_attention_matches_xla(small, reference, attention):
    model, *rest = small
    out, grad = output_and_grad(with_memory(model, attention=attention), *rest)
    assert_trees_close({"out": out}, {"out": reference[0]}, KERNEL_TOL)
    assert_trees_close(grad, reference[1], KERNEL_TOL)


@pytest.mark.parametrize("remat, policy", [("blocks", ""), ("full", ""), ("blocks", POLICY)])
def test_remat_keeps_the_gradient(small, reference, remat, policy):
    model, *rest = small
    out, grad = output_and_grad(with_memory(model, remat=remat, remat_policy=policy), *rest)
    assert_trees_close({"out": out}, {"out": reference[0]}, REMAT_TOL)
    assert_trees_close(grad, reference[1], REMAT_TOL)


def remat_equations(jaxpr):
    """Every remat equation in `jaxpr` and the jaxprs nested in its equations."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("remat") or eqn.primitive.name == "checkpoint":
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += remat_equations(inner)
    return found


@pytest.mark.parametrize(
    "remat, policy, levels, count",
    [
        ("none", "", 1, 0),
        ("blocks", "", 2, 5),  # Two down blocks, the mid block, two up blocks.
        ("blocks", POLICY, 1, 3),
        ("full", POLICY, 1, 1),  # One around the whole UNet.
    ],
)
def test_remat_is_in_the_program(small, remat, policy, levels, count):
    """The grad's program holds one remat per unit, each with the policy asked for."""
    model, _, inputs, _ = small
    model = with_memory(model, remat=remat, remat_policy=policy)
    if levels == 2:
        model = dataclasses.replace(model, unet=two_level_unet(model))
    params = jax.eval_shape(model.unet.init_weights, jax.random.key(0))

    def loss(p):
        return jnp.sum(model.predict_noise(p, *inputs))

    found = remat_equations(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    assert len(found) == count
    expected = getattr(jax.checkpoint_policies, policy) if policy else None
    assert all(eqn.params["policy"] is expected for eqn in found)


def test_params_tree_is_the_same_for_every_option(small):
    """Initialised with each option's fields: the names and shapes pretrained files hold."""
    model = small[0]

    def shapes(memory):
        unet = two_level_unet(model).clone(**memory.unet_attributes())
        tree = jax.eval_shape(unet.init_weights, jax.random.key(0))
        return {k: (v.shape, v.dtype) for k, v in flatten_dict(tree).items()}

    expected = shapes(unet_memory.MemoryOptions())
    assert len(expected) > 100
    for attention in ("dot_product", "chunked"):
        assert shapes(unet_memory.MemoryOptions(attention, "blocks")) == expected


@pytest.mark.parametrize(
    "options, field",
    [
        ({"attention": "flash"}, "model.attention='flash'"),
        ({"remat": "layers"}, "model.remat='layers'"),
        ({"remat": "blocks", "remat_policy": "dots_savable"}, "model.remat_policy='dots_savable'"),
        ({"remat": "blocks", "remat_policy": "save_only_these_names"}, "policy factory"),
        ({"remat_policy": POLICY}, "needs model.remat"),
    ],
)
def test_unknown_options_are_config_errors(options, field):
    with pytest.raises(errors.ConfigError, match=field):
        models.build_tiny(small_config(**options), jax.random.key(0))


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="splash is available on TPU")
def test_splash_off_tpu_is_a_config_error_at_set_up(tmp_path):
    with pytest.raises(errors.ConfigError, match="model.attention='splash'.*'cpu'"):
        models.build_tiny(small_config(attention="splash"), jax.random.key(0))
    # Before any file is read: a missing folder would be a NotFound.
    with pytest.raises(errors.ConfigError, match="model.attention='splash'"):
        weights.load_modules(str(tmp_path / "absent"), small_config(attention="splash"))


def test_pretrained_modules_take_the_options(small, tmp_path):
    model = small[0]
    directory = tmp_path / "sd"
    configs = {
        "unet": model.unet.config.to_dict(),
        "vae": model.vae.config.to_dict(),
        "text_encoder": model.text_encoder.config.to_dict(),
        "scheduler": model.scheduler_config,
    }
    for component, config in configs.items():
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        os.makedirs(directory / component)
        with open(directory / component / name, "w") as f:
            json.dump(config, f)
    model.tokenizer.save_pretrained(str(directory / "tokenizer"))
    for options, attention in [({"attention": "chunked"}, "chunked"), ({"remat": "full"}, "xla")]:
        loaded = weights.load_modules(str(directory), small_config(**options))
        assert loaded.unet.attention == attention
        assert loaded.unet.remat == "none"  # `full` wraps the whole call instead.
        assert loaded.memory == unet_memory.MemoryOptions(**options)


def test_lora_scale_keeps_the_options(small):
    model = with_memory(small[0], attention="dot_product", remat="full")
    scaled = lora.with_adapter_scale(model, 2.0)
    assert scaled.memory == model.memory and scaled.unet.attention == "dot_product"
    assert scaled.unet.lora_scale == scaled.text_encoder.lora_scale == 2.0


def test_a_model_whose_unet_disagrees_is_refused(small):
    model = small[0]
    with pytest.raises(ValueError, match="the UNet was built with"):
        dataclasses.replace(model, memory=unet_memory.MemoryOptions())


def test_splash_kernel_matches_dot_product_in_interpret_mode():
    """The splash wrapper's padding (queries 64 -> 128, SD's 77 text tokens -> 128, heads
    40 -> 128 wide) and segment ids, run by the Pallas interpreter on CPU."""
    q, k, v = (
        jax.random.normal(key, (1, length, 1, 40))
        for key, length in zip(jax.random.split(jax.random.key(0), 3), (64, 77, 77), strict=True)
    )
    scale = 40**-0.5

    def output_and_grads(kernel):
        def loss(q, k, v):
            out = kernel(q, k, v, scale)
            return jnp.sum(jnp.sin(out)), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, got), got_grads = output_and_grads(
        functools.partial(layers.splash_attention, interpret=True)
    )
    (_, want), want_grads = output_and_grads(layers.dot_product_attention)
    np.testing.assert_allclose(got, want, atol=2e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5)
