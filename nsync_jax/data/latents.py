"""Cached VAE posterior moments of a style set, so frozen-VAE runs skip the encoder per step.

When the VAE is frozen (every scope we have), the encoder's output for an image never
changes. So, as MaxDiffusion does, we encode every image once at start, both unflipped and
flipped (the flip happens before encoding, as in the pixel path), and keep the posterior's
mean and standard deviation. The step still draws a fresh posterior sample
`mean + std · ε` each time (`step.sample_posterior`), so training sees the same
distribution as the pixel path; with the same rng it computes the same loss.

Each host encodes a contiguous 1/P of the examples (so it decodes only those images) and
the hosts all-gather the moments: every host then holds the whole cache, since its slices
of the global batches cover the whole set within a few epochs. Memory: 2 flips × 2
moments × latent size per example, float32: 256 KB at 512 px (64×64×4 latents), 275 MB
for monet2photo's 1072 images. benchmarks/latent_cache.py measures the step-time saving.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import jax
import numpy as np

from nsync_jax import hosts
from nsync_jax.data.examples import BadImageError, ExampleSet, to_pixels

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

    def parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.mean, self.std, self.bad

    def moments(self, rows: np.ndarray, flips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of examples `rows`, each flipped where `flips` is set."""
        which = np.asarray(flips, np.int64)
        return self.mean[rows, which], self.std[rows, which]


def shard_rows(count: int, shard_index: int, shard_count: int) -> range:
    """The contiguous block of `ceil(count / shard_count)` example indices a host encodes."""
    per = -(-count // shard_count)
    return range(min(count, shard_index * per), min(count, (shard_index + 1) * per))


def encode_shard(
    examples: ExampleSet,
    moments_fn: MomentsFn,
    batch_size: int,
    on_bad_image: str,
    resolution: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> LatentCache:
    """Moments of shard `shard_index`'s rows (`shard_rows`), zero-padded to the full
    shard length so every host's part has the same shape for the all-gather.

    Args:
      examples: the set to encode; only this shard's images are read.
      moments_fn: float32 NCHW pixels [b, 3, R, R] → (mean, std) arrays of equal shape;
        called with `b == batch_size` always (short last batches are padded), so a jitted
        function compiles once.
      batch_size: images per encoder call; each holds half as many examples (both flips).
      on_bad_image: "error" raises `BadImageError` naming the example; "skip" marks it bad.
      resolution: the images' side (for the moments' shape without reading an image).
      shard_index, shard_count: which contiguous block of the examples to encode.
    """
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"data.latent_batch_size must be even and >= 2, got {batch_size}")
    pixel_shape = jax.ShapeDtypeStruct((batch_size, 3, resolution, resolution), np.float32)
    mean_shape = jax.eval_shape(moments_fn, pixel_shape)[0].shape
    rows = shard_rows(len(examples), shard_index, shard_count)
    per = -(-len(examples) // shard_count)
    mean_all = np.zeros((per, 2, *mean_shape[1:]), np.float32)
    std_all = np.zeros_like(mean_all)
    bad = np.zeros(per, bool)
    per_call = batch_size // 2
    for first in range(rows.start, rows.stop, per_call):
        good, images = [], []
        for i in range(first, min(first + per_call, rows.stop)):
            try:
                images.append(examples.image(i))
                good.append(i - rows.start)
            except BadImageError as e:
                if on_bad_image != "skip":
                    raise e.refused() from e
                logging.warning("latent cache: skipping bad image: %s", e)
                bad[i - rows.start] = True
        if not good:
            continue
        stack = np.stack(images)
        both = np.concatenate([stack, stack[:, :, ::-1]])  # Unflipped rows, then flipped.
        pad = np.repeat(both[:1], batch_size - len(both), axis=0)
        mean, std = (
            np.asarray(m, np.float32) for m in moments_fn(to_pixels(np.concatenate([both, pad])))
        )
        k = len(good)
        for flip in (0, 1):
            mean_all[good, flip] = mean[flip * k : (flip + 1) * k]
            std_all[good, flip] = std[flip * k : (flip + 1) * k]
    return LatentCache(mean_all, std_all, bad)


def assemble(shards: LatentCache, count: int) -> LatentCache:
    """One cache from every host's `encode_shard` stacked on a leading axis."""

    def flat(x):
        return x.reshape(-1, *x.shape[2:])[:count]

    return LatentCache(flat(shards.mean), flat(shards.std), flat(shards.bad))


def _process_allgather(shard: LatentCache) -> LatentCache:
    from jax.experimental import multihost_utils

    # Encoding took each process its own time (only process 0 finds its compilations
    # cached): meet first, or gloo (CPU) may give up on the gather (`hosts.sync`).
    hosts.sync("latents encoded")
    return LatentCache(*multihost_utils.process_allgather(shard.parts(), tiled=False))


def build_latent_cache(
    examples: ExampleSet,
    moments_fn: MomentsFn,
    batch_size: int,
    on_bad_image: str,
    resolution: int,
    name: str = "examples",
    process_index: int = 0,
    process_count: int = 1,
    allgather: Callable[[LatentCache], LatentCache] = _process_allgather,
) -> LatentCache:
    """Every example's moments, unflipped and flipped: each host encodes its contiguous
    share (`encode_shard`, same arguments) and the shares are all-gathered, so a host
    decodes only 1/`process_count` of the images and all hosts hold the whole cache."""
    start = time.perf_counter()
    shard = encode_shard(
        examples, moments_fn, batch_size, on_bad_image, resolution, process_index, process_count
    )
    if process_count > 1:
        gathered = allgather(shard)
    else:
        gathered = LatentCache(*(x[None] for x in shard.parts()))
    cache = assemble(gathered, len(examples))
    if cache.bad.all():
        raise ValueError(f"every one of the {len(examples)} images of {name} is bad")
    logging.info(
        "latent cache of %s: %d examples × 2 flips, %s latents, %.1f MB, %.1f s (%d bad; "
        "this host encoded %d)",
        name,
        len(examples),
        cache.mean.shape[2:],
        (cache.mean.nbytes + cache.std.nbytes) / 2**20,
        time.perf_counter() - start,
        int(cache.bad.sum()),
        len(shard_rows(len(examples), process_index, process_count)),
    )
    return cache
