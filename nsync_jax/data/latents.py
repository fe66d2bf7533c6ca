"""Cached VAE posterior moments of a style set, so frozen-VAE runs skip the encoder per step.

When the VAE is frozen (every scope we have), the encoder's output for an image never
changes. So, as MaxDiffusion does, we encode every image once at start, both unflipped and
flipped (the flip happens before encoding, as in the pixel path), and keep the posterior's
mean and standard deviation. The step still draws a fresh posterior sample
`mean + std · ε` each time (`step.sample_posterior`), so training sees the same
distribution as the pixel path; with the same rng it computes the same loss.

Memory: 2 flips × 2 moments × latent size per example, float32: 256 KB at 512 px (64×64×4
latents), 275 MB for monet2photo's 1072 images. Every host encodes every image once (a
host's slices cover the whole set within a few epochs); at 1072 images this is a minute
of start-up and is measured by benchmarks/latent_cache.py for the step side.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np

from nsync_jax.data.examples import BadImageError, ExampleSet

MomentsFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class LatentCache:
    """Posterior moments per example and flip.

    Attributes:
      mean: float32 [N, 2, ...]; index 1 of axis 1 is the horizontally flipped image.
      std: float32 [N, 2, ...], same layout.
      bad: bool [N]; examples whose image could not be read (their moments are zeros).
    """

    mean: np.ndarray
    std: np.ndarray
    bad: np.ndarray

    def __len__(self) -> int:
        return len(self.mean)

    def moments(self, rows: np.ndarray, flips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of examples `rows`, each flipped where `flips` is set."""
        which = np.asarray(flips, np.int64)
        return self.mean[rows, which], self.std[rows, which]


def _pixels(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC → float32 NCHW in [-1, 1] (as `pipeline._to_pixels` without flips)."""
    return np.ascontiguousarray((images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2))


def build_latent_cache(
    examples: ExampleSet,
    moments_fn: MomentsFn,
    batch_size: int,
    on_bad_image: str,
    name: str = "examples",
) -> LatentCache:
    """Encodes every example of `examples`, unflipped and flipped, `batch_size` at a time.

    Args:
      examples: the set to encode (all of it, on every host).
      moments_fn: float32 NCHW pixels [b, 3, R, R] → (mean, std) arrays of equal shape;
        called with `b == batch_size` always (short last batches are padded), so a jitted
        function compiles once.
      batch_size: images per encoder call; each holds half as many examples (both flips).
      on_bad_image: "error" raises `BadImageError` naming the example; "skip" marks it bad.
      name: how the log names the set.
    """
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"data.latent_batch_size must be even and >= 2, got {batch_size}")
    start = time.perf_counter()
    n = len(examples)
    per_call = batch_size // 2
    bad = np.zeros(n, bool)
    mean_all = std_all = None
    for first in range(0, n, per_call):
        good, images = [], []
        for i in range(first, min(first + per_call, n)):
            try:
                images.append(examples.image(i))
                good.append(i)
            except BadImageError as e:
                if on_bad_image != "skip":
                    raise
                logging.warning("latent cache: skipping bad image: %s", e)
                bad[i] = True
        if not good:
            continue
        stack = np.stack(images)
        both = np.concatenate([stack, stack[:, :, ::-1]])  # Unflipped rows, then flipped.
        pad = np.repeat(both[:1], batch_size - len(both), axis=0)
        mean, std = (
            np.asarray(m, np.float32) for m in moments_fn(_pixels(np.concatenate([both, pad])))
        )
        if mean_all is None:
            mean_all = np.zeros((n, 2, *mean.shape[1:]), np.float32)
            std_all = np.zeros_like(mean_all)
        k = len(good)
        for flip in (0, 1):
            mean_all[good, flip] = mean[flip * k : (flip + 1) * k]
            std_all[good, flip] = std[flip * k : (flip + 1) * k]
    if mean_all is None:
        raise ValueError(f"every one of the {n} images of {name} is bad")
    cache = LatentCache(mean_all, std_all, bad)
    logging.info(
        "latent cache of %s: %d examples × 2 flips, %s latents, %.1f MB, %.1f s (%d bad)",
        name,
        n,
        cache.mean.shape[2:],
        (cache.mean.nbytes + cache.std.nbytes) / 2**20,
        time.perf_counter() - start,
        int(bad.sum()),
    )
    return cache
