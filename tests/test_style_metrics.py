"""The benchmark's fixed style measure and its content classifier."""

import os
import sys

import numpy as np
import pytest

from nsync_jax.data import digits

# Benchmark-only code lives under benchmarks/, which the benchmark scripts import as
# sibling modules; the test reaches it the same way.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import sklearn  # noqa: F401  (the digits; the test extra: fail, never skip)
import style_metrics


@pytest.fixture(scope="module")
def reference():
    return style_metrics.StyleReference.fit(8)


def test_style_score_separates_styled_from_plain(reference):
    scores = {
        r: style_metrics.style_scores(digits.digits_examples(8, r, count=200).images, reference)
        for r in digits.RENDERINGS
    }
    assert scores["styled"]["style"].min() > scores["plain"]["style"].max()
    assert scores["styled"]["style"].mean() > 0.85 and scores["plain"]["style"].mean() < 0.1
    # Each half of the style moves only its own part.
    assert scores["palette"]["palette"].mean() > 0.95 and scores["stripes"]["palette"].max() == 0
    assert scores["stripes"]["stripes"].mean() > 0.75 > 0.2 > scores["palette"]["stripes"].mean()
    # Stripes off the style's band positions are not the style.
    shifted = np.roll(
        digits.digits_examples(8, "styled", count=100).images, 2, axis=2
    )  # Half a period.
    assert style_metrics.style_scores(shifted, reference)["stripes"].mean() < 0.2


def test_content_classifier_reads_digits_in_every_rendering():
    classifier = style_metrics.ContentClassifier(8)
    assert classifier.test_accuracy > 0.9
    noise = np.random.default_rng(0).integers(0, 256, (200, 8, 8, 3)).astype(np.uint8)
    assert classifier.accuracy(noise, np.zeros(200, int)) < 0.4
    with pytest.raises(ValueError, match="8px"):
        classifier.predict(np.zeros((1, 16, 16, 3), np.uint8))


def test_frame_and_unique_style_are_measured_apart():
    """The testbed's shared attribute (the frame) and its unique style (palette + stripes,
    read inside the frame) each move only their own score."""
    framed_reference = style_metrics.StyleReference.fit(8, framed=True)
    scores = {
        r: style_metrics.style_scores(
            digits.digits_examples(8, r, count=200).images, framed_reference
        )
        for r in ("plain", "framed", "styled", "styled_framed")
    }
    for r in ("framed", "styled_framed"):
        assert scores[r]["frame"].min() == 1.0
    for r in ("plain", "styled"):
        assert scores[r]["frame"].max() == 0.0
    # Inside the frame, a frame changes nothing: the unique style reads the same.
    np.testing.assert_allclose(scores["styled_framed"]["style"], scores["styled"]["style"])
    np.testing.assert_allclose(scores["framed"]["style"], scores["plain"]["style"])
    assert scores["styled_framed"]["style"].mean() > 0.8 > 0.15 > scores["framed"]["style"].mean()
