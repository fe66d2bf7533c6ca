"""The style encoder benchmark's rendered styles and scorer, and a micro run of its driver."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import sklearn  # noqa: E402, F401  (the digits; the test extra: fail, never skip)
import style_family  # noqa: E402


@pytest.fixture(scope="module")
def scorer():
    return style_family.StyleScorer(8, count=100)


def test_styles_differ_and_keep_the_digit():
    intensity = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    renders = [style_family.render_style(intensity, k) for k in range(len(style_family.STYLES))]
    for k, image in enumerate(renders):
        assert image.shape == (3, 8, 8, 3) and image.dtype == np.uint8
        for other in renders[k + 1 :]:
            assert not np.array_equal(image, other)
    # Zero ink is the background colour everywhere.
    blank = style_family.render_style(np.zeros((1, 8, 8), np.float32), 1)
    assert (blank == np.asarray(style_family.STYLES[1].background, np.uint8)).all()
    masks = [style_family.pattern_mask(p, 8) for p in style_family.PATTERNS]
    assert all(m.mean() == 0.5 for m in masks)
    assert len({m.tobytes() for m in masks}) == len(masks)
    assert style_family.UNSEEN not in style_family.SEEN


def test_each_style_scores_highest_on_its_own_real_images(scorer):
    assert scorer.test_accuracy > 0.95
    for k in range(len(style_family.STYLES)):
        images, _, _ = style_family.style_images(k, 8, 60, seed=5)
        style = [scorer.scores(images, j)["style"].mean() for j in range(len(style_family.STYLES))]
        distance = [
            scorer.scores(images, j)["palette_distance"].mean()
            for j in range(len(style_family.STYLES))
        ]
        assert int(np.argmax(style)) == k and style[k] > 0.9
        assert int(np.argmin(distance)) == k


def test_plain_and_framed_digits_are_no_style(scorer):
    from nsync_jax.data import digits

    plain = digits.digits_examples(8, "plain", count=40).images
    framed = digits.digits_examples(8, "framed", count=40).images
    assert (scorer.predict(plain) == style_family.PLAIN).mean() > 0.9
    assert (scorer.predict(framed) == style_family.PLAIN).mean() > 0.9  # Border not read.
    for k in range(len(style_family.STYLES)):
        own, _, _ = style_family.style_images(k, 8, 40, seed=5)
        assert (
            scorer.scores(plain, k)["palette_distance"].mean()
            > 2 * scorer.scores(own, k)["palette_distance"].mean()
        )


def test_folder_set_has_digit_only_captions(tmp_path):
    images, labels, index = style_family.style_images(2, 8, 5)
    style_family.write_folder(str(tmp_path), images, labels, [f"x{i}" for i in index])
    with open(tmp_path / "metadata.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["text"] for r in records] == [
        f"a handwritten digit {style_family.digits.NAMES[d]}" for d in labels
    ]
    assert all((tmp_path / r["file_name"]).exists() for r in records)


def test_palette_vocabulary_names_every_family_style_and_never_draws_one():
    assert [style_family.words(s) for s in style_family.STYLES] == [
        "orange on navy, diagonal",
        "cyan on black, rows",
        "yellow on green, columns",
        "pink on purple, checker",
        "sky on brown, antidiagonal",
    ]
    luminance = lambda c: sum(c) / 3  # noqa: E731
    darkest_ink = min(luminance(c) for c in style_family.INKS.values())
    assert all(luminance(c) < darkest_ink for c in style_family.BACKGROUNDS.values())
    family = {(s.background, s.ink, s.pattern) for s in style_family.STYLES}
    drawn = style_family.palette_styles(2000, seed=0)
    assert not {(n.background, n.ink, n.pattern) for n, _ in drawn} & family
    # Each family colour and pattern is drawn, in other combinations.
    assert {n.background for n, _ in drawn} == set(style_family.BACKGROUNDS.values())
    assert {n.ink for n, _ in drawn} == set(style_family.INKS.values())
    for named, rendered in drawn[:50]:
        assert rendered.pattern == named.pattern
        shift = np.abs(np.subtract(rendered.ink, named.ink))
        assert shift.max() <= 12
    assert drawn[:20] == style_family.palette_styles(20, seed=0)  # Seeded.


def test_palette_folder_captions_name_the_style_and_fit_the_tiny_tokenizer(tmp_path):
    from nsync_jax import models

    folder = tmp_path / "palette"
    count = style_family.write_palette_folder(str(folder), 8, per_digit=1, seed=3)
    with open(folder / "metadata.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert count == len(records) == 1797
    assert records[0]["text"].startswith("a handwritten digit zero, ")
    tokenizer_dir = models.write_tiny_tokenizer(str(tmp_path / "tok"), 32)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    longest = max(len(tokenizer(r["text"]).input_ids) for r in records)
    assert longest <= 32  # The digits bases' max_length: no caption is truncated.
    image = np.asarray(Image.open(folder / records[0]["file_name"]))
    assert image.shape == (8, 8, 3)


def _micro_frame_base(cache) -> str:
    """A digits base of the frame testbed pretrained 20 steps, as `style_benchmark.py
    --testbed frame --base_steps 20` makes it (<cache>/frame-base-20/base)."""
    import style_benchmark

    from nsync_jax import train

    cache = os.path.join(str(cache), "frame-base-20")
    base = os.path.join(cache, "base")
    train.train(style_benchmark.base_config(cache, 20, "frame"), base)
    return base


@pytest.mark.slow
def test_driver_micro_end_to_end(tmp_path):
    """Every method of one seed at micro sizes on a digits base (`NSYNC_DIGITS_BASE`, e.g.
    the benchmark's 12000-step one; else a 20-step base made here); a second sitting reruns
    nothing."""
    import style_encoder_benchmark as driver

    base = os.environ.get("NSYNC_DIGITS_BASE") or _micro_frame_base(tmp_path / "cache")
    assert os.path.isdir(base), f"no digits base at {base}"
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "style_encoder_benchmark.py")]
    flags = (
        f"--out {tmp_path}/o --base {base} --seeds 0 --train_per_style 8 --refs 1 "
        "--steps_per_batch 2 --stage2_epochs 1 --stage3_epochs 1 --ti_steps 2"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([*command, *flags.split()], check=True, env=env)
    with open(tmp_path / "o" / "results.json") as f:
        record = json.load(f)
    assert list(record["runs"]) == list(driver.METHODS)
    assert "style_unseen" not in record["summary"]["stage1"]  # No vectors of unseen styles.
    for method in driver.METHODS[1:]:
        assert {"style_seen", "style_unseen", "content_seen"} <= set(record["summary"][method])
    assert len(record["base_fingerprint"]) == 64
    parts = sorted((tmp_path / "o" / "parts").iterdir())
    times = [p.stat().st_mtime for p in parts]
    subprocess.run([*command, *flags.split()], check=True, env=env)
    assert [p.stat().st_mtime for p in parts] == times


@pytest.mark.slow
def test_palette_base_micro_then_the_driver_on_it(tmp_path):
    """palette_base.py trains (micro) and scores a base; the driver runs every method on it."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    script = os.path.join(ROOT, "benchmarks", "palette_base.py")
    flags = f"--steps 20 --per_digit 1 --per_class 1 --cache {tmp_path}/c --out {tmp_path}/p"
    subprocess.run([sys.executable, script, *flags.split()], check=True, env=env)
    with open(tmp_path / "p" / "results.json") as f:
        record = json.load(f)
    rows = record["base_samples"]
    assert sum("never trained" in name for name in rows) == len(style_family.STYLES)
    assert all(0.0 <= row["content"] <= 1.0 for row in rows.values())
    base = str(tmp_path / "c" / "palette-base-20" / "base")
    driver = os.path.join(ROOT, "benchmarks", "style_encoder_benchmark.py")
    flags = (
        f"--out {tmp_path}/o --base {base} --seeds 0 --train_per_style 8 --refs 1 "
        "--steps_per_batch 2 --stage2_epochs 1 --stage3_epochs 1 --ti_steps 2"
    )
    subprocess.run([sys.executable, driver, *flags.split()], check=True, env=env)
    with open(tmp_path / "o" / "results.json") as f:
        summary = json.load(f)["summary"]
    assert {"words", "stage3-dual"} <= set(summary)
    assert sum(summary["stage3-dual"]["classes_0"]) == 10  # One reference × 10 digits.
