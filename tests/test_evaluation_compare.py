"""Batched, sharded embedding and the config-chosen metric report (tiny embedders)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import default
from nsync_jax import sharding
from nsync_jax.evaluation import clip_embed, compare, images, metrics
from nsync_jax.models.clip import CLIPVisionConfig


@pytest.fixture(scope="module")
def mesh():
    config = default.get_config()
    return sharding.make_mesh(config.mesh)  # 8 fake CPU devices on one data axis


@pytest.fixture(scope="module")
def tiny_embedders():
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        projection_dim=12,
    )
    encoder = clip_embed.ClipImageEncoder(vision)
    params = clip_embed.init_params(encoder, jax.random.key(0))
    w = np.random.default_rng(0).normal(size=(8 * 8 * 3, 16)).astype(np.float32)

    def clip(name, prep):
        return compare.Embedder(name, lambda p, x: encoder.apply({"params": p}, x), params, prep)

    return {
        "csd": clip("csd", lambda im: images.csd_preprocess(im, 16)),
        "cmmd": clip("cmmd", lambda im: images.cmmd_preprocess(im, 16)),
        "inception": compare.Embedder(
            "inception",
            lambda p, x: jnp.reshape(x, (x.shape[0], -1)) @ p,
            w,
            lambda im: np.asarray(im.resize((8, 8)), np.float32) / 255.0,
        ),
    }


def _images(n, seed, size=(20, 24)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), np.uint8) for _ in range(n)]


def test_embed_keeps_every_image_in_order(mesh, tiny_embedders):
    embedder = tiny_embedders["cmmd"]
    image_set = _images(11, 0)  # batch 4 rounds up to 8 devices: one full, one padded batch
    got = compare.embed(embedder, image_set, batch_size=4, mesh=mesh)
    pixels = np.stack([embedder.preprocess(images.load_rgb(im)) for im in image_set])
    expected = np.asarray(embedder.apply(embedder.params, pixels))
    assert got.shape == (11, 12)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_compare_reports_chosen_metrics(mesh, tiny_embedders):
    config = default.get_config().eval
    config.batch_size = 8
    config.kid_subsets = 10
    config.fid_bootstrap = 3
    real, gen = _images(9, 1), _images(7, 2, size=(30, 18))
    report = compare.compare(real, gen, config, mesh, embedders=tiny_embedders)
    feats = {
        k: (compare.embed(e, real, 8, mesh), compare.embed(e, gen, 8, mesh))
        for k, e in tiny_embedders.items()
    }
    assert report["n_real"] == 9 and report["n_generated"] == 7
    assert report["csd"] == pytest.approx(metrics.csd_score(*feats["csd"]))
    assert report["cmmd"] == pytest.approx(metrics.cmmd(*feats["cmmd"]))
    assert report["fid"] == pytest.approx(metrics.fid(*feats["inception"]))
    kid = metrics.kid(*feats["inception"], num_subsets=10, seed=0)
    assert report["kid_mean"] == pytest.approx(kid.mean)
    assert report["kid_subset_size"] == 7 and report["kid_subsets"] == 10
    assert report["inception_variant"] == "pytorch_fid" and report["fid_bootstrap"] == 3
    assert "fid_bootstrap_std" in report

    config.metrics = ("cmmd",)
    only = compare.compare(real, gen, config, mesh, embedders=tiny_embedders)
    assert "cmmd" in only and not {"csd", "fid", "kid_mean"} & set(only)


def test_compare_errors(mesh, tiny_embedders):
    config = default.get_config().eval
    config.metrics = ("csd", "lpips")
    with pytest.raises(ValueError, match="lpips"):
        compare.compare(_images(2, 0), _images(2, 1), config, mesh)
    config.metrics = ("kid",)  # No weights configured: an error, never random weights.
    with pytest.raises(FileNotFoundError, match="inception"):
        compare.compare(_images(2, 0), _images(2, 1), config, mesh)


def test_compare_folders_writes_json(tmp_path, mesh, tiny_embedders, monkeypatch):
    for name, seed in (("real", 3), ("gen", 4)):
        (tmp_path / name).mkdir()
        for i, pixels in enumerate(_images(3, seed)):
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    Image.fromarray(_images(1, 5)[0]).save(tmp_path / "real" / "notes.txt.png")
    # A sample_to_dir folder: only the files prompts.jsonl lists count (not grid.png).
    Image.fromarray(_images(1, 6)[0]).save(tmp_path / "gen" / "grid.png")
    records = [json.dumps({"file": f"{i}.png", "prompt": "p"}) for i in range(3)]
    (tmp_path / "gen" / "prompts.jsonl").write_text("\n".join(records) + "\n")
    config = default.get_config().eval
    config.metrics = ("cmmd",)
    config.real_dir, config.generated_dir = str(tmp_path / "real"), str(tmp_path / "gen")
    monkeypatch.setattr(compare, "build_embedder", lambda kind, cfg: tiny_embedders[kind])
    out = str(tmp_path / "report" / "metrics.json")
    report = compare.compare_folders(config, mesh, out)
    assert json.loads(open(out).read()) == report
    assert report["n_generated"] == 3 and report["n_real"] == 4
    with pytest.raises(ValueError, match="no images"):
        images.list_images(str(tmp_path / "report"))
