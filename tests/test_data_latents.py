"""Tests of nsync_jax/data/latents.py: the cache's layout, bad images, and that training
on cached moments gives the pixel path's loss for the same rng (the one-level plumbing
model, `plumbing.py`)."""

import functools
import logging

import jax
import numpy as np
import plumbing
import pytest

from configs import demo as demo_config
from nsync_jax import diffusion, scope, step
from nsync_jax.data import demo, pipeline
from nsync_jax.data.examples import LazyExamples
from nsync_jax.data.latents import LatentCache, assemble, build_latent_cache, encode_shard


def _moments(pixels):
    # Stand-in encoder: mean = the pixels, std = the pixels + 10 (NCHW kept).
    return pixels, pixels + 10


def _lazy(count, bad=(), calls=None):
    def read(i):
        if calls is not None:
            calls.append(i)
        if i in bad:
            raise OSError("cannot identify image file")
        image = np.zeros((4, 4, 3), np.uint8)
        image[:, 0] = 10 * i + 1  # Left column marks the example; a flip moves it right.
        return image

    ids = [f"x{i}" for i in range(count)]
    return LazyExamples(ids, ["c"] * count, ids, read, 4, True, identify=lambda rows: {})


def test_cache_holds_both_flips_of_every_example():
    calls = []

    def moments(pixels):
        if isinstance(pixels, np.ndarray):  # Not the shape-only trace.
            calls.append(pixels.shape)
        return _moments(pixels)

    cache = build_latent_cache(_lazy(5), moments, batch_size=4, on_bad_image="error", resolution=4)
    assert cache.mean.shape == (5, 2, 3, 4, 4) and calls == [(4, 3, 4, 4)] * 3
    left = (cache.mean[:, :, 0, 0, 0] + 1) * 127.5
    right = (cache.mean[:, :, 0, 0, 3] + 1) * 127.5
    np.testing.assert_allclose(left[:, 0], 10 * np.arange(5) + 1, atol=1e-4)
    np.testing.assert_allclose(right[:, 1], 10 * np.arange(5) + 1, atol=1e-4)
    np.testing.assert_allclose(cache.std, cache.mean + 10)
    mean, _ = cache.moments(np.array([3, 3]), np.array([False, True]))
    np.testing.assert_array_equal(mean, cache.mean[3])


def test_bad_images_error_or_are_marked(caplog):
    with pytest.raises(ValueError, match="'x1'"):
        build_latent_cache(_lazy(3, bad=(1,)), _moments, 4, "error", 4)
    with caplog.at_level(logging.WARNING):
        cache = build_latent_cache(_lazy(6, bad=(2, 3)), _moments, 4, "skip", 4)
    assert cache.bad.tolist() == [False, False, True, True, False, False]
    assert (cache.mean[2:4] == 0).all() and "x3" in caplog.text
    with pytest.raises(ValueError, match="even"):
        build_latent_cache(_lazy(2), _moments, 3, "error", 4)


def test_two_hosts_encode_disjoint_shares_that_gather_to_the_whole_cache():
    whole = build_latent_cache(_lazy(7, bad=(5,)), _moments, 4, "skip", 4)
    shards, reads = [], []
    for host in range(2):
        calls = []
        shards.append(
            encode_shard(_lazy(7, bad=(5,), calls=calls), _moments, 4, "skip", 4, host, 2)
        )
        reads.append(calls)
    assert reads == [[0, 1, 2, 3], [4, 5, 6]]
    stacked = LatentCache(
        *(np.stack(parts) for parts in zip(*(c.parts() for c in shards), strict=True))
    )
    gathered = assemble(stacked, 7)
    for got, want in zip(gathered.parts(), whole.parts(), strict=True):
        np.testing.assert_array_equal(got, want)
    # The same through build_latent_cache's all-gather hook, as host 1 sees it.
    via_hook = build_latent_cache(
        _lazy(7, bad=(5,)), _moments, 4, "skip", 4, "x", 1, 2, allgather=lambda _: stacked
    )
    np.testing.assert_array_equal(via_hook.mean, whole.mean)


def test_all_bad_is_an_error():
    with pytest.raises(ValueError, match="every one of the 2 images"):
        build_latent_cache(_lazy(2, bad=(0, 1)), _moments, 4, "skip", 4)


def test_cached_moments_give_the_pixel_loss(plumbing_sd):
    config = plumbing.config()
    model, params = plumbing_sd
    the_scope = scope.UnetScope()
    trainable, frozen = the_scope.split(params)
    positives = demo.demo_examples(6, config.model.resolution, 0, True)
    batches = pipeline.PairedBatches(
        positives,
        None,
        model.tokenize,
        "{caption} in the style of {style}",
        "<s*>",
        4,
        0,
        True,
        process_index=0,
        process_count=1,
    )
    pixel_batch = batches.batch(1)
    encode = jax.jit(functools.partial(step.posterior_moments, model))
    batches.cache_latents(lambda px: encode(frozen["vae"], px), 4, config.model.resolution)
    cached_batch = batches.batch(1)
    assert "pixels" not in cached_batch["positive"]
    rng, noise_rng = jax.random.split(jax.random.key(7))
    direct = model.encode_images(frozen["vae"], pixel_batch["positive"]["pixels"], rng)
    sampled = step.sample_posterior(
        model, cached_batch["positive"]["latent_mean"], cached_batch["positive"]["latent_std"], rng
    )
    np.testing.assert_allclose(sampled, direct, atol=1e-4, rtol=1e-4)
    loss = jax.jit(
        step.make_branch_loss(model, the_scope, diffusion.make_schedule(model.scheduler_config))
    )
    pixel_loss = loss(trainable, frozen, pixel_batch["positive"], rng, noise_rng)
    cached_loss = loss(trainable, frozen, cached_batch["positive"], rng, noise_rng)
    np.testing.assert_allclose(cached_loss, pixel_loss, rtol=1e-4)
    other = loss(trainable, frozen, cached_batch["positive"], jax.random.key(8), noise_rng)
    assert abs(float(other) - float(pixel_loss)) > 1e-6  # The posterior is still sampled.


@pytest.mark.slow
def test_trainer_with_cached_latents_steps_like_the_pixel_trainer():
    from nsync_jax import sharding, train

    losses = []
    for cache in (False, True):
        config = demo_config.get_config()
        config.data.cache_latents = cache
        trainer = train.setup(config)
        local = trainer.batches.batch(0)
        assert ("latent_mean" in local["negative"]) == cache
        batch = sharding.global_batch(trainer.mesh, local)
        _, metrics = trainer.step_fn(trainer.state, batch)
        losses.append((float(metrics["loss_pos"]), float(metrics["loss_neg"])))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
