"""A family of rendered styles for the digits, and a scorer that tells them apart.

The style encoder's evidence (issue 16 §2) needs many images per style and styles never
seen in training. Each style here is (background colour, ink colour, a dark-band pattern
on the ink), applied to scikit-learn's digits like `data/digits.py`'s "styled" rendering
(style 0 is that rendering): rgb = background + (ink − background) · intensity, with the
ink darkened to `digits.STRIPE_DARKEN` on the pattern's dark bands. Ink is brighter than
the background in every style, so `style_metrics.ContentClassifier` (standardized
luminance) reads the digit in all of them. Captions are the digit only.

`StyleScorer` is a nearest-centroid classifier over the styles and a null class (plain
white-on-black digits) on fixed features of an image's interior (its estimated background
and ink colours, and the band contrast of every pattern), fitted on real renderings. The
one-pixel border is left out: the pretrained base draws its "painting" frame
(`digits.FRAME`) for prompts "... in the style of ...", which is none of these styles. An
image's style score for style k is whether it is classified as k, and its palette distance
to k is the RGB distance of its estimated background and ink to k's (mean of the two).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image

from nsync_jax.data import digits

PATTERNS = ("diagonal", "horizontal", "vertical", "checker", "antidiagonal")


@dataclasses.dataclass(frozen=True)
class Style:
    name: str
    background: tuple[int, int, int]
    ink: tuple[int, int, int]
    pattern: str


STYLES = (
    Style("navy-orange-diagonal", (25, 35, 100), (245, 160, 40), "diagonal"),
    Style("black-cyan-horizontal", (10, 10, 10), (60, 220, 230), "horizontal"),
    Style("green-yellow-vertical", (20, 70, 30), (240, 230, 80), "vertical"),
    Style("purple-pink-checker", (60, 20, 70), (250, 170, 210), "checker"),
    Style("brown-blue-antidiagonal", (80, 45, 20), (150, 200, 250), "antidiagonal"),
)
UNSEEN = 4  # Never in the style encoder's training (stages 1-3).
SEEN = tuple(k for k in range(len(STYLES)) if k != UNSEEN)


def pattern_mask(pattern: str, resolution: int) -> np.ndarray:
    """Bool [R, R]: the pattern's dark bands (bands of 2 px, period 4)."""
    y, x = np.mgrid[0:resolution, 0:resolution]
    half = digits.STRIPE_PERIOD // 2
    band = {
        "diagonal": (x + y) // half,
        "horizontal": y // half,
        "vertical": x // half,
        "checker": x // half + y // half,
        "antidiagonal": (x - y + 2 * resolution) // half,
    }[pattern]
    return band % 2 == 1


def render_style(intensity: np.ndarray, k: int) -> np.ndarray:
    """uint8 [N, R, R, 3] of ink intensities [N, R, R] in [0, 1] in style `k`."""
    return render(intensity, STYLES[k])


def render(intensity: np.ndarray, style: Style) -> np.ndarray:
    """uint8 [N, R, R, 3] of ink intensities [N, R, R] in [0, 1] in `style`."""
    dark = pattern_mask(style.pattern, intensity.shape[-1])[None]
    ink = np.where(dark, intensity * digits.STRIPE_DARKEN, intensity)[..., None]
    background = np.asarray(style.background, np.float32) / 255.0
    colour = np.asarray(style.ink, np.float32) / 255.0
    rgb = background + (colour - background) * ink
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def style_images(
    k: int, resolution: int, count: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 images, labels, sklearn indices) of `count` digits (classes balanced, a
    shuffle seeded by (seed, k)) in style `k`."""
    intensity, labels = digits.load_raw()
    index = digits.select(labels, tuple(range(10)), count, 1000 * seed + k)
    return render_style(digits.upsample(intensity[index], resolution), k), labels[index], index


def write_folder(path: str, images: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    """A `data.source='folder'` set: PNGs and metadata.jsonl with digit-only captions."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        for image, label, name in zip(images, labels, names, strict=True):
            Image.fromarray(image).save(os.path.join(path, f"{name}.png"))
            f.write(json.dumps({"file_name": f"{name}.png", "text": digits.caption(int(label))}))
            f.write("\n")


# A vocabulary of styles for a base that can draw them (`palette_base.py`): dark
# backgrounds, bright inks (brighter than every background, so the content classifier
# reads the digit) and the patterns, each named by a word of its caption. Every colour
# of `STYLES` is here under one name; their exact combinations are not drawn.
BACKGROUNDS = {
    "black": (10, 10, 10),
    "navy": (25, 35, 100),
    "green": (20, 70, 30),
    "purple": (60, 20, 70),
    "brown": (80, 45, 20),
    "maroon": (90, 15, 25),
    "teal": (10, 60, 70),
}
INKS = {
    "orange": (245, 160, 40),
    "cyan": (60, 220, 230),
    "yellow": (240, 230, 80),
    "pink": (250, 170, 210),
    "sky": (150, 200, 250),
    "white": (235, 235, 235),
    "lime": (150, 240, 90),
    "red": (240, 60, 50),
}
PATTERN_WORDS = dict(
    zip(PATTERNS, ("diagonal", "rows", "columns", "checker", "antidiagonal"), strict=True)
)


def _name_of(colour: tuple[int, int, int], table: dict) -> str:
    return next(name for name, value in table.items() if value == colour)


def words(style: Style) -> str:
    """The caption words of a style of the vocabulary: "orange on navy, diagonal"."""
    ink, background = _name_of(style.ink, INKS), _name_of(style.background, BACKGROUNDS)
    return f"{ink} on {background}, {PATTERN_WORDS[style.pattern]}"


def palette_caption(label: int, style: Style) -> str:
    return f"{digits.caption(label)}, {words(style)}"


def palette_styles(count: int, seed: int, jitter: int = 12) -> list[tuple[Style, Style]]:
    """`count` random (named style, rendered style) pairs of the vocabulary, never one of
    `STYLES`' combinations; the rendered colours are the named ones jittered by up to
    ±`jitter` per channel (uniform)."""
    rng = np.random.default_rng(seed)
    family = {(s.background, s.ink, s.pattern) for s in STYLES}
    out = []
    while len(out) < count:
        background = list(BACKGROUNDS.values())[rng.integers(len(BACKGROUNDS))]
        ink = list(INKS.values())[rng.integers(len(INKS))]
        pattern = PATTERNS[rng.integers(len(PATTERNS))]
        if (background, ink, pattern) in family:
            continue
        named = Style("", background, ink, pattern)
        out.append(
            (named, Style("", _jitter(background, rng, jitter), _jitter(ink, rng, jitter), pattern))
        )
    return out


def _jitter(colour: tuple[int, int, int], rng: np.random.Generator, jitter: int):
    moved = np.asarray(colour) + rng.integers(-jitter, jitter + 1, size=3)
    return tuple(int(c) for c in np.clip(moved, 0, 255))


def write_palette_folder(path: str, resolution: int, per_digit: int, seed: int) -> int:
    """A `data.source='folder'` set: every scikit-learn digit in `per_digit` random
    styles of the vocabulary, captioned with the digit and the style's words; returns
    the number of images."""
    intensity, labels = digits.load_raw()
    intensity = digits.upsample(intensity, resolution)
    styles = palette_styles(len(labels) * per_digit, seed)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        for i, (named, rendered) in enumerate(styles):
            index = i % len(labels)
            image = render(intensity[index : index + 1], rendered)[0]
            name = f"palette-{i:05d}.png"
            Image.fromarray(image).save(os.path.join(path, name))
            caption = palette_caption(int(labels[index]), named)
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return len(styles)


def interior(images: np.ndarray) -> np.ndarray:
    """[N, R − 2, R − 2, 3]: the images without their one-pixel border."""
    return images[:, 1:-1, 1:-1]


def colours(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Estimated (background, ink) RGB in [0, 1] per image: the mean colour of its darkest
    half and of its brightest eighth of interior pixels (by luminance)."""
    pixels = interior(images).reshape(len(images), -1, 3).astype(np.float32) / 255.0
    order = np.argsort(pixels.mean(axis=-1), axis=1)
    sorted_ = np.take_along_axis(pixels, order[..., None], axis=1)
    n = pixels.shape[1]
    return sorted_[:, : n // 2].mean(axis=1), sorted_[:, -max(1, n // 8) :].mean(axis=1)


def band_contrasts(images: np.ndarray) -> np.ndarray:
    """[N, len(PATTERNS)]: 1 − (luminance above the minimum on a pattern's dark bands over
    that on its bright bands), ink pixels weighted by their brightness."""
    luminance = interior(images).astype(np.float32).mean(axis=-1) / 255.0
    luminance = luminance - luminance.min(axis=(1, 2), keepdims=True)
    out = []
    for pattern in PATTERNS:
        dark = pattern_mask(pattern, images.shape[1])[1:-1, 1:-1]
        ratio = luminance[:, dark].mean(axis=1) / np.maximum(luminance[:, ~dark].mean(axis=1), 1e-6)
        out.append(1.0 - ratio)
    return np.stack(out, axis=1)


def features(images: np.ndarray) -> np.ndarray:
    background, ink = colours(images)
    return np.concatenate([background, ink, band_contrasts(images)], axis=1)


PLAIN = len(STYLES)  # The scorer's null class: plain digits (white ink on black).


def class_images(k: int, resolution: int, count: int, seed: int) -> np.ndarray:
    """Real images of style `k`, or plain digits for `PLAIN`."""
    if k == PLAIN:
        return digits.digits_examples(resolution, "plain", count=count, seed=seed).images
    return style_images(k, resolution, count, seed)[0]


class StyleScorer:
    """Nearest-centroid classifier (standardized `features`) over the styles and `PLAIN`,
    fitted on `count` real digits of each at `resolution`; `test_accuracy` on others."""

    def __init__(self, resolution: int, count: int = 300, seed: int = 7):
        rows, targets, test_rows, test_targets = [], [], [], []
        for k in range(len(STYLES) + 1):
            images = class_images(k, resolution, 2 * count, seed)
            rows.append(features(images[:count]))
            test_rows.append(features(images[count:]))
            targets += [k] * count
            test_targets += [k] * count
        train = np.concatenate(rows)
        self.mean, self.std = train.mean(axis=0), train.std(axis=0) + 1e-6
        standard = (train - self.mean) / self.std
        self.centroids = np.stack(
            [standard[np.asarray(targets) == k].mean(axis=0) for k in range(len(STYLES) + 1)]
        )
        self.resolution = resolution
        self.test_accuracy = float(
            (self.predict_features(np.concatenate(test_rows)) == np.asarray(test_targets)).mean()
        )

    def distances(self, feature_rows: np.ndarray) -> np.ndarray:
        standard = (feature_rows - self.mean) / self.std
        return np.linalg.norm(standard[:, None] - self.centroids[None], axis=-1)

    def predict_features(self, feature_rows: np.ndarray) -> np.ndarray:
        return self.distances(feature_rows).argmin(axis=1)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.predict_features(features(images))

    def scores(self, images: np.ndarray, k: int) -> dict[str, np.ndarray]:
        """Per image: `style` (1 if classified as style k) and `palette_distance` to k."""
        background, ink = colours(images)
        style = STYLES[k]
        distance = 0.5 * (
            np.linalg.norm(background - np.asarray(style.background) / 255.0, axis=-1)
            + np.linalg.norm(ink - np.asarray(style.ink) / 255.0, axis=-1)
        )
        return {
            "style": (self.predict(images) == k).astype(np.float64),
            "palette_distance": distance,
        }
