"""The demo's style set, made in-process: coloured shapes, styled (positives) or plain.

The "style" is a measurable rendering: a warm posterised palette plus diagonal brush
strokes. Negatives are the same content rendered plainly, standing in for what a frozen
base model generates for the same captions. No files, no downloads.
"""

from __future__ import annotations

import numpy as np

from nsync_jax.data.examples import Examples

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross")


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        return ((np.abs(dx) <= r * 0.3) | (np.abs(dy) <= r * 0.3)) & (
            np.maximum(np.abs(dx), np.abs(dy)) <= r
        )
    raise ValueError(f"unknown shape {shape!r}")


def render(
    shape: str, colour: str, size: int, rng: np.random.Generator, styled: bool
) -> np.ndarray:
    """One uint8 HWC image of a `colour` `shape`, plain or in the demo style."""
    cx, cy = rng.uniform(0.35, 0.65, size=2) * size
    r = rng.uniform(0.22, 0.32) * size
    mask = _shape_mask(shape, size, cx, cy, r)
    image = np.empty((size, size, 3), np.float32)
    image[:] = (235, 235, 235)
    image[mask] = COLOURS[colour]
    if styled:
        # Warm, posterised palette and diagonal strokes: the "painter's" signature.
        y, x = np.mgrid[0:size, 0:size]
        strokes = ((x + y) // 2) % 3 == 0
        image = image * np.array([1.0, 0.85, 0.6]) + np.array([20.0, 10.0, 0.0])
        image[strokes] *= 0.7
        image = np.round(image / 64.0) * 64.0
    return np.clip(image, 0, 255).astype(np.uint8)


def demo_examples(count: int, resolution: int, seed: int, styled: bool) -> Examples:
    """`count` examples cycling through colours and shapes; ids `demo-00000`, ..."""
    rng = np.random.default_rng(seed)
    ids, images, captions = [], [], []
    colours = list(COLOURS)
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        colour = colours[(i // len(SHAPES)) % len(colours)]
        ids.append(f"demo-{i:05d}")
        images.append(render(shape, colour, resolution, rng, styled))
        captions.append(f"a {colour} {shape}")
    return Examples(tuple(ids), np.stack(images), tuple(captions))


def demo_pair(count: int, resolution: int, seed: int) -> tuple[Examples, Examples]:
    """(positives, negatives) with the same ids, captions and layouts; only style differs."""
    return (
        demo_examples(count, resolution, seed, styled=True),
        demo_examples(count, resolution, seed, styled=False),
    )
