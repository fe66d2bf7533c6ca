"""Fixed measures of the digits benchmark's style and content, for generated images.

Style (`style_scores`) is measured directly on the rendering's two ingredients, with no
learned model, so it means the same thing for every method:

- palette: fraction of pixels nearer (in RGB) to the style's colour ramp (navy → orange,
  and navy → darkened orange) than to the grey axis. ~1 for styled renderings, ~0 for
  plain ones (black is on the grey axis; the navy background is 0.2 away from it).
- stripes: how much darker the dark diagonal bands are than the bright ones, at the
  style's fixed band positions (the rendering always puts them there, so a model that
  learned the style does too): 1 − (dark-band / bright-band mean luminance above the
  image's minimum), divided by the same for styled real digits, clipped to [0, 1].
  Plain digits score about 0.16 at 8 px (a stroke can fall mostly on one kind of band)
  and 0.01 at 16 px; styled ones about 0.8 and 1.0 (means over the data set). A
  spectral (phase-free) measure separated worse at 8 px: strokes are as fine as stripes.
- style: the mean of the two.
- frame: the testbed's shared "painting" attribute (`digits.FRAME`): fraction of the
  one-pixel border nearer the frame colour than the grey axis and the style ramps. With
  `region=interior` the two style measures skip that border, so a frame does not count
  against them and they measure the unique style alone.

Content (`ContentClassifier`) is a scikit-learn logistic regression trained once on the
digits in all four renderings (plain, styled, palette only, stripes only), so it reads the
digit whatever part of the style an image carries; `accuracy` is the fraction of images
that show the prompted digit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nsync_jax.data import digits


def _segment_distance(pixels: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """RGB distance of each pixel [..., 3] to the segment start → end."""
    direction = end - start
    t = np.clip(((pixels - start) @ direction) / (direction @ direction), 0.0, 1.0)
    return np.linalg.norm(pixels - (start + t[..., None] * direction), axis=-1)


def _ramp_and_grey(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances of pixels [..., 3] in [0, 1] to the style's colour ramps and to grey."""
    grey = _segment_distance(pixels, np.zeros(3), np.ones(3))
    ramp = np.minimum(
        _segment_distance(pixels, digits.BACKGROUND, digits.INK),
        _segment_distance(
            pixels,
            digits.BACKGROUND,
            digits.BACKGROUND + (digits.INK - digits.BACKGROUND) * digits.STRIPE_DARKEN,
        ),
    )
    return ramp, grey


def _region(images: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    return np.ones(images.shape[1:3], bool) if region is None else region


def interior(resolution: int) -> np.ndarray:
    """Bool [R, R]: every pixel but the one-pixel frame."""
    return ~digits.border_mask(resolution)


def palette_score(images: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """Per image: fraction of pixels (of `region`, default all) nearer the style ramps
    than the grey axis."""
    ramp, grey = _ramp_and_grey(images[:, _region(images, region)].astype(np.float32) / 255.0)
    return (ramp < grey).mean(axis=1)


def frame_score(images: np.ndarray) -> np.ndarray:
    """Per image: fraction of border pixels nearer the frame colour than the grey axis and
    the style ramps."""
    pixels = images[:, digits.border_mask(images.shape[1])].astype(np.float32) / 255.0
    ramp, grey = _ramp_and_grey(pixels)
    frame = np.linalg.norm(pixels - digits.FRAME, axis=-1)
    return (frame < np.minimum(ramp, grey)).mean(axis=1)


def band_ratio(images: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """Per image: mean luminance above the darkest pixel on the dark stripe bands over
    that on the bright bands (≈1 without stripes, ≈0.55 with), within `region`."""
    inside = _region(images, region)
    luminance = images.astype(np.float32).mean(axis=-1) / 255.0
    luminance = luminance - np.where(inside, luminance, np.inf).min(axis=(1, 2), keepdims=True)
    dark = digits.stripe_mask(images.shape[1])
    bright_mean = luminance[:, ~dark & inside].mean(axis=1)
    return luminance[:, dark & inside].mean(axis=1) / np.maximum(bright_mean, 1e-6)


@dataclasses.dataclass(frozen=True)
class StyleReference:
    """The median band ratio of real digits in the style: what the stripe score calls 1.

    Attributes:
      band_ratio: that median.
      region: bool [R, R] of the pixels the style measures read; None for all.
    """

    band_ratio: float
    region: np.ndarray | None = None

    @classmethod
    def fit(cls, resolution: int, framed: bool = False) -> StyleReference:
        """From `styled` digits, or `styled_framed` ones read inside the frame."""
        region = interior(resolution) if framed else None
        styled = digits.digits_examples(resolution, "styled_framed" if framed else "styled")
        return cls(float(np.median(band_ratio(styled.images, region))), region)


def style_scores(images: np.ndarray, reference: StyleReference) -> dict[str, np.ndarray]:
    """Per image {"palette", "stripes", "style", "frame"} in [0, 1], from uint8
    [N, R, R, 3]; the first three read `reference.region`."""
    palette = palette_score(images, reference.region)
    contrast = (1.0 - band_ratio(images, reference.region)) / (1.0 - reference.band_ratio)
    stripes = np.clip(contrast, 0.0, 1.0)
    return {
        "palette": palette,
        "stripes": stripes,
        "style": 0.5 * (palette + stripes),
        "frame": frame_score(images),
    }


class ContentClassifier:
    """Which digit an RGB image shows: logistic regression on all four renderings.

    Args:
      resolution: image side the classifier reads.
      seed: the train/test split's seed; `test_accuracy` is measured on the held-out fifth.
    """

    def __init__(self, resolution: int, seed: int = 0):
        from sklearn.linear_model import LogisticRegression

        intensity, labels = digits.load_raw()
        upsampled = digits.upsample(intensity, resolution)
        features = np.concatenate(
            [self.features(digits.render(upsampled, r)) for r in digits.RENDERINGS]
        )
        targets = np.tile(labels, len(digits.RENDERINGS))
        # Split by image, so no test digit is seen in another rendering during training.
        held_out = np.random.default_rng(seed).random(len(labels)) < 0.2
        test = np.tile(held_out, len(digits.RENDERINGS))
        self.model = LogisticRegression(max_iter=300, C=0.05)
        self.model.fit(features[~test], targets[~test])
        self.test_accuracy = float((self.model.predict(features[test]) == targets[test]).mean())
        self.resolution = resolution

    @staticmethod
    def features(images: np.ndarray) -> np.ndarray:
        """Per-image standardized luminance: invariant to the palette's affine colour map."""
        luminance = images.astype(np.float32).mean(axis=-1).reshape(len(images), -1)
        centred = luminance - luminance.mean(axis=1, keepdims=True)
        return centred / (centred.std(axis=1, keepdims=True) + 1e-3)

    def predict(self, images: np.ndarray) -> np.ndarray:
        if images.shape[1:3] != (self.resolution, self.resolution):
            raise ValueError(
                f"classifier reads {self.resolution}px images, got {images.shape[1:3]}"
            )
        return self.model.predict(self.features(images))

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float((self.predict(images) == np.asarray(labels)).mean())
