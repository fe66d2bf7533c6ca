"""scikit-learn's bundled handwritten digits as a content set, plain or in a fixed style.

`sklearn.datasets.load_digits()` ships 1797 8×8 greyscale digits inside the package (no
download). They are upsampled to the model resolution and rendered as RGB either

- `plain`: white ink on black, grey levels only; or
- `styled`: the benchmark's "painter": a navy background, orange ink, and diagonal
  stripes (period 4 px along x+y) that darken every other band of the ink;
- `framed` / `styled_framed`: the same with a one-pixel green frame around the image, the
  testbed's generic "painting" attribute (what every painting has: a frame), shared by
  the style set and by the base model's "in the style of painting" images;
- `plain+framed`: every digit twice, plain ("a handwritten digit seven") and framed
  ("a handwritten digit seven in the style of painting"): the base model's pretraining
  set, so that "painting" means the frame to it.

Captions describe content only: "a handwritten digit seven". Ids are `digit-<index>`,
the index into sklearn's array, so any subset pairs with any other rendering by id.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from nsync_jax.data.examples import Examples

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RENDERINGS = ("plain", "styled", "palette", "stripes", "framed", "styled_framed")
MIXES = {"plain+framed": ("plain", "framed")}  # Renderings a source concatenates.
BACKGROUND = np.array([25.0, 35.0, 100.0]) / 255.0  # Navy.
INK = np.array([245.0, 160.0, 40.0]) / 255.0  # Orange.
STRIPE_PERIOD = 4  # Pixels along x+y; bands of half this width.
STRIPE_DARKEN = 0.55  # Ink brightness on the dark bands.
FRAME = np.array([40.0, 170.0, 60.0]) / 255.0  # Green: far from grey, navy and orange.
PAINTING = " in the style of painting"  # Caption suffix of framed images in `plain+framed`.


def caption(label: int) -> str:
    return f"a handwritten digit {NAMES[label]}"


def load_raw() -> tuple[np.ndarray, np.ndarray]:
    """(float32 [1797, 8, 8] intensities in [0, 1], int labels) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "data.source='digits' needs scikit-learn: pip install -e '.[bench]'"
        ) from e
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def upsample(intensity: np.ndarray, resolution: int) -> np.ndarray:
    """Bicubic upsampling of [N, 8, 8] intensities to [N, R, R], clipped to [0, 1]."""
    out = np.empty((len(intensity), resolution, resolution), np.float32)
    for i, image in enumerate(intensity):
        img = Image.fromarray(image.astype(np.float32), mode="F")
        out[i] = np.asarray(img.resize((resolution, resolution), Image.Resampling.BICUBIC))
    return np.clip(out, 0.0, 1.0)


def stripe_mask(resolution: int) -> np.ndarray:
    """Bool [R, R]: the dark diagonal bands."""
    y, x = np.mgrid[0:resolution, 0:resolution]
    return ((x + y) // (STRIPE_PERIOD // 2)) % 2 == 1


def border_mask(resolution: int) -> np.ndarray:
    """Bool [R, R]: the one-pixel frame."""
    mask = np.ones((resolution, resolution), bool)
    mask[1:-1, 1:-1] = False
    return mask


def render(intensity: np.ndarray, rendering: str) -> np.ndarray:
    """uint8 [N, R, R, 3] images of [N, R, R] ink intensities in [0, 1].

    `palette` and `stripes` are the style's two halves alone; the content classifier
    trains on them too, so it reads the digit whatever part of the style a model learned.
    """
    if rendering not in RENDERINGS:
        raise ValueError(f"rendering {rendering!r} is not one of {RENDERINGS + tuple(MIXES)}")
    if rendering.endswith("framed"):
        unframed = render(intensity, "styled" if rendering == "styled_framed" else "plain")
        frame = np.round(FRAME * 255.0).astype(np.uint8)
        return np.where(border_mask(intensity.shape[-1])[None, :, :, None], frame, unframed)
    ink = intensity[..., None]
    if rendering in ("stripes", "styled"):
        dark = stripe_mask(intensity.shape[-1])[None, :, :, None]
        ink = np.where(dark, ink * STRIPE_DARKEN, ink)
    if rendering in ("palette", "styled"):
        rgb = BACKGROUND + (INK - BACKGROUND) * ink
    else:
        rgb = np.repeat(ink, 3, axis=-1)
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def select(
    labels: np.ndarray, classes: tuple[int, ...] | list[int], count: int, seed: int
) -> np.ndarray:
    """Indices of `count` images of `classes` (0: all), a seeded shuffle, classes balanced
    by taking them round-robin."""
    bad = [c for c in classes if not 0 <= int(c) <= 9]
    if bad or not classes:
        raise ValueError(f"data.digits_classes must be digits 0-9, got {tuple(classes)}")
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in sorted(set(classes))]
    order = [p[i] for i in range(max(map(len, pools))) for p in pools if i < len(p)]
    if count < 0:
        raise ValueError(f"data.digits_count must be >= 0, got {count}")
    return np.asarray(order if count == 0 else order[:count], np.int64)


def digits_examples(
    resolution: int, rendering: str, classes=tuple(range(10)), count: int = 0, seed: int = 0
) -> Examples:
    """The digits of `classes` (`count` of them, 0: all) rendered `rendering` (or each
    rendering of a mix in `MIXES`, one after the other; ids of the second and later carry
    the rendering's name, captions of framed ones the "painting" suffix)."""
    intensity, labels = load_raw()
    index = select(labels, classes, count, seed)
    upsampled = upsample(intensity[index], resolution)
    if rendering not in MIXES:
        return Examples(
            tuple(f"digit-{i:04d}" for i in index),
            render(upsampled, rendering),
            tuple(caption(int(labels[i])) for i in index),
        )
    ids, images, captions = [], [], []
    for n, part in enumerate(MIXES[rendering]):
        ids += [f"digit-{i:04d}" + (f"-{part}" if n else "") for i in index]
        images.append(render(upsampled, part))
        suffix = PAINTING if part.endswith("framed") else ""
        captions += [caption(int(labels[i])) + suffix for i in index]
    return Examples(tuple(ids), np.concatenate(images), tuple(captions))
