"""Sampling with a reference image: the guidance formulas and a tiny end-to-end draw."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from nsync_jax import errors, sampling
from nsync_jax.style_encoder import generate


def test_dual_guidance_formula():
    rng = np.random.default_rng(0)
    e0, et, ets = (rng.normal(size=(2, 4, 3, 3)).astype(np.float32) for _ in range(3))
    preds = jnp.stack([e0, et, ets], axis=1)
    out = np.asarray(jax.jit(generate.dual_guidance(7.5, 1.5))(preds))
    np.testing.assert_allclose(out, e0 + 7.5 * (et - e0) + 1.5 * (ets - et), rtol=1e-5, atol=1e-5)
    # s_t = 1, s_s = 1: the styled prediction alone; s_s = 0: CFG on the text alone.
    np.testing.assert_allclose(generate.dual_guidance(1.0, 1.0)(preds), ets, atol=1e-6)
    np.testing.assert_allclose(
        generate.dual_guidance(3.0, 0.0)(preds),
        sampling.classifier_free(3.0)(jnp.stack([e0, et], axis=1)),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        sampling.classifier_free(7.5)(jnp.stack([e0, ets], axis=1)),
        e0 + 7.5 * (ets - e0),
        rtol=1e-5,
        atol=1e-5,
    )


def test_style_image_paths(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert generate.style_image_paths(str(tmp_path)) == [
        str(tmp_path / "a.jpg"),
        str(tmp_path / "b.png"),
    ]
    assert generate.style_image_paths(str(tmp_path / "b.png")) == [str(tmp_path / "b.png")]
    with pytest.raises(errors.NotFound):
        generate.style_image_paths(str(tmp_path / "missing"))
    with pytest.raises(errors.UserError, match="a.jpg"):
        generate.read_style_image(str(tmp_path / "a.jpg"), 32)  # Empty: not an image.


@pytest.mark.slow
def test_sample_from_a_reference_image(tmp_path):
    """Stage 1 and 2 on the tiny config, then images from a reference, both guidances."""
    from configs import style_encoder_tiny
    from nsync_jax.style_encoder import run

    workdir = str(tmp_path / "run")
    for stage in (1, 2):
        config = style_encoder_tiny.get_config()
        config.stage, config.data.demo_count = stage, 8
        config.stage1.steps_per_batch, config.stage2.epochs = 1, 1
        run.train_stage(config, workdir)
    style_run = generate.load_style_run(workdir)
    assert (style_run.stage, style_run.step) == (2, 1)
    reference = str(tmp_path / "ref.png")
    Image.fromarray(np.full((40, 48, 3), 200, np.uint8)).save(reference)
    sample = style_encoder_tiny.get_config().sample
    sample.scheduler, sample.num_steps, sample.batch_per_device = "ddim", 3, 1
    images = {}
    for guidance in (0.0, 1.0):
        sample.style_guidance = guidance
        out = str(tmp_path / f"out{guidance}")
        paths = generate.sample_to_dir(sample, style_run, [reference], ["a red circle"], out, 2)
        assert len(paths) == 2 and os.path.exists(os.path.join(out, "grid.png"))
        records = [json.loads(line) for line in open(os.path.join(out, "prompts.jsonl"))]
        assert records[0]["style_image"] == reference and records[1]["image_seed"] == 1
        assert records[0]["style_guidance"] == guidance
        images[guidance] = [np.asarray(Image.open(path)) for path in paths]
        assert images[guidance][0].shape == (32, 32, 3)
    # Same seeds, other guidance: the predictions differ by (s_t - 1)(ε(c_ts) - ε(c_t)),
    # s_t = 7.5 (module docstring), so every image changes.
    for plain, dual in zip(images[0.0], images[1.0], strict=True):
        assert not np.array_equal(plain, dual)
