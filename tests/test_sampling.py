"""Tests of the sampler on the demo's tiny model: determinism, batch invariance, outputs."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import demo
from nsync_jax import runs, sampling, sharding

PROMPTS = ["a red circle", "a blue square", "a green ring", "a yellow cross", "a purple dot"]
SEEDS = [11, 12, 13, 14, 15]


def _mesh(devices):
    return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}), devices)


def _sampler(model, params, devices, batch_per_device=1, seed=0, **settings):
    settings = {"scheduler": "ddim", "num_steps": 2, "guidance_scale": 7.5, **settings}
    return sampling.Sampler(
        model,
        params,
        _mesh(devices),
        sampling.SamplerSettings(negative_prompt="", **settings),
        seed=seed,
        batch_per_device=batch_per_device,
    )


def _floats(sampler, prompts, seeds):
    out = {}
    for offset, images in sampler.iterate(prompts, seeds):
        for i, image in enumerate(images):
            out[offset + i] = image
    return np.stack([out[i] for i in range(len(prompts))])


@pytest.fixture(scope="module")
def tiny():
    config = demo.get_config()
    model, params = runs.build_base(config)
    return config, model, params


@pytest.fixture(scope="module")
def sampler8(tiny):
    """Eight devices, one image each: five prompts run with three padding rows."""
    _, model, params = tiny
    return _sampler(model, params, jax.devices())


def test_settings_are_checked():
    with pytest.raises(ValueError, match="scheduler 'lms'"):
        sampling.SamplerSettings("lms", 10, 7.5, "")
    with pytest.raises(ValueError, match="pndm scheduler needs num_steps >= 4"):
        sampling.SamplerSettings("pndm", 2, 7.5, "")
    with pytest.raises(ValueError, match="guidance_scale"):
        sampling.SamplerSettings("ddim", 2, 0.5, "")


def test_initial_noise_depends_only_on_the_image_seed():
    seeds = jax.numpy.asarray([3, 7, 9], jax.numpy.uint32)
    batch = sampling.initial_noise(np.uint32(5), seeds, (4, 2, 2))
    alone = sampling.initial_noise(np.uint32(5), seeds[1:2], (4, 2, 2))
    np.testing.assert_array_equal(batch[1], alone[0])
    assert not np.allclose(batch[0], batch[1])
    other_base = sampling.initial_noise(np.uint32(6), seeds[1:2], (4, 2, 2))
    assert not np.allclose(alone, other_base)


def test_pixels_do_not_depend_on_batch_position_size_or_device(tiny, sampler8):
    _, model, params = tiny
    together = _floats(sampler8, PROMPTS, SEEDS)
    assert together.shape == (5, 32, 32, 3)
    assert together.min() >= 0.0 and together.max() <= 1.0
    # Same sampler, reversed order: every image moves to another row and device.
    reversed_ = _floats(sampler8, PROMPTS[::-1], SEEDS[::-1])[::-1]
    np.testing.assert_allclose(reversed_, together, atol=1e-5)
    # One device, batch of two, image 3 alone (with one padding row).
    single = _sampler(model, params, jax.devices()[:1], batch_per_device=2)
    alone = _floats(single, PROMPTS[3:4], SEEDS[3:4])
    np.testing.assert_allclose(alone[0], together[3], atol=1e-5)


def test_seeds_decide_the_pixels(tiny, sampler8):
    _, model, params = tiny
    first = sampler8.generate(PROMPTS[:2], [1, 1])
    again = sampler8.generate(PROMPTS[:2], [1, 1])
    np.testing.assert_array_equal(first, again)
    other_image_seed = sampler8.generate(PROMPTS[:2], [2, 2])
    assert np.abs(first.astype(int) - other_image_seed).mean() > 1
    other_base = _sampler(model, params, jax.devices(), seed=1).generate(PROMPTS[:2], [1, 1])
    assert np.abs(first.astype(int) - other_base).mean() > 1


def test_default_pndm_scheduler_runs(tiny):
    _, model, params = tiny
    sampler = _sampler(model, params, jax.devices()[:2], scheduler="pndm", num_steps=4)
    images = sampler.generate(PROMPTS[:2], SEEDS[:2])
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert images.std() > 0


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["euler", "dpm_solver"])
def test_other_schedulers_run(tiny, scheduler):
    _, model, params = tiny
    sampler = _sampler(model, params, jax.devices()[:2], scheduler=scheduler)
    images = sampler.generate(PROMPTS[:2], SEEDS[:2])
    assert images.shape == (2, 32, 32, 3) and images.std() > 0


@pytest.mark.slow
def test_guidance_changes_the_image(tiny, sampler8):
    _, model, params = tiny
    unguided = _sampler(model, params, jax.devices(), guidance_scale=1.0)
    a = unguided.generate(PROMPTS[:2], SEEDS[:2])
    b = sampler8.generate(PROMPTS[:2], SEEDS[:2])
    assert a.shape == b.shape and np.abs(a.astype(int) - b).mean() > 0.1


def test_labelled_grid_layout():
    images = [np.full((16, 16, 3), 60 * i, np.uint8) for i in range(5)]
    grid = np.asarray(sampling.labelled_grid(images, [f"tile {i}" for i in range(5)]))
    rows, columns = 2, 3
    assert grid.shape[1] == columns * 16
    tile_with_text = grid.shape[0] // rows
    assert tile_with_text > 16
    np.testing.assert_array_equal(grid[tile_with_text : tile_with_text + 16, 16:32], images[4])
    label_strip = grid[16:tile_with_text, :16]
    assert (label_strip < 128).any(), "no text drawn under the first tile"
    with pytest.raises(ValueError, match="as many labels"):
        sampling.labelled_grid(images, ["one"])


def test_resize():
    image = np.zeros((32, 32, 3), np.uint8)
    assert sampling.resize(image, 0) is image
    assert sampling.resize(image, 16).shape == (16, 16, 3)


def test_sample_to_dir_writes_images_prompts_and_grid(tiny, sampler8, tmp_path):
    config, model, params = tiny
    config = ml_collections.ConfigDict(config.to_dict())
    config.sample.update(scheduler="ddim", num_steps=2, batch_per_device=1, size=16)
    paths = sampling.sample_to_dir(
        config, PROMPTS[:2], str(tmp_path), num_per_prompt=2, model_and_params=(model, params)
    )
    assert [os.path.basename(p) for p in paths] == [f"{i:05d}.png" for i in range(4)]
    with open(tmp_path / "prompts.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["prompt"] for r in records] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert [r["image_seed"] for r in records] == [0, 1, 2, 3]
    written = np.asarray(sampling.Image.open(paths[2]))
    expected = sampling.resize(sampler8.generate([PROMPTS[1]], [2])[0], 16)
    assert np.abs(written.astype(int) - expected).max() <= 1
    assert os.path.exists(tmp_path / "grid.png")


def test_split_prompts_use_the_evaluation_template():
    config = demo.get_config()
    config.data.demo_count = 3
    prompts = sampling.split_prompts(config, "test")
    assert prompts == [f"a red {s} in the style of <s*>" for s in ("circle", "square", "triangle")]
