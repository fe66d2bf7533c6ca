"""Aspect-ratio buckets: images keep (about) their shape instead of a square centre crop.

`data.buckets` lists (height, width) sizes of about equal area. Each example goes to the
bucket nearest its aspect ratio (by |log(h/w) − log(bh/bw)|; a tie goes to the bucket
listed first), is resized to cover it and centre-cropped to it, and every global batch is
drawn from one bucket, so the step sees one image shape per batch and compiles once per
bucket. `"auto"` derives SD/kohya-style buckets from `model.resolution` (`auto_buckets`).

Which bucket and which rows step s takes is a pure function of (seed, s), as without
buckets (`BucketPlan`): epoch e permutes all examples by `(seed, e)` (the permutation the
plain stream uses), each bucket's members in that order are cut into full batches of the
global batch size (a remainder of fewer than a batch waits for another epoch, whose
permutation leaves other images over), and the epoch's batches are taken in an order
permuted by `(seed, stream, e)`. So every epoch has the same number of steps, a bucket
with fewer images than a batch is never drawn (logged at start), and a resumed run reads
exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from nsync_jax import errors

Bucket = tuple[int, int]  # (height, width) in pixels.

AUTO = "auto"
# `auto`: sides are multiples of this (kohya's `bucket_reso_steps` default) ...
AUTO_STEP = 64
# ... and the long side at most this many times the short one.
AUTO_MAX_RATIO = 2.0
# First word of the batch-order draws' seed after the run's seed (flips use 1 and 2,
# caption dropout 3 and 4).
_BUCKET_ORDER_STREAM = 5


def auto_buckets(
    resolution: int, step: int = AUTO_STEP, max_ratio: float = AUTO_MAX_RATIO
) -> tuple[Bucket, ...]:
    """SD/kohya-style buckets of area at most `resolution`², from tall to wide.

    For every side a that is a multiple of `step`, the other side b is the largest multiple
    of `step` with a·b ≤ resolution², and both a x b and b x a are buckets (kohya's rule);
    pairs whose long side exceeds `max_ratio` times the short one are left out. At 512:
    640x384, 576x448, 512x512, 448x576, 384x640 (height x width).

    Raises:
      errors.ConfigError: `resolution` is not a positive multiple of `step`.
    """
    if resolution <= 0 or resolution % step:
        raise errors.ConfigError(
            f"data.buckets='auto' needs model.resolution to be a positive multiple of {step}, "
            f"got {resolution}; list the buckets instead, e.g. ((24, 40), (32, 32), (40, 24))"
        )
    area = resolution * resolution
    found = set()
    for side in range(step, area // step + 1, step):
        other = area // side // step * step
        if other >= step and max(side, other) <= max_ratio * min(side, other):
            found |= {(side, other), (other, side)}
    return tuple(sorted(found, key=lambda b: b[1] / b[0]))


def resolve(value, resolution: int) -> tuple[Bucket, ...]:
    """`data.buckets` as (height, width) pairs: () off, "auto", or the listed pairs.

    Raises:
      errors.ConfigError: naming the bad value or bucket (not a pair of positive integers,
        listed twice).
    """
    if isinstance(value, str):
        if value != AUTO:
            raise errors.ConfigError(
                f"data.buckets={value!r}: expected (), {AUTO!r} or (height, width) pairs"
            )
        return auto_buckets(resolution)
    buckets = []
    for bucket in value:
        ok = (
            isinstance(bucket, Sequence)
            and len(bucket) == 2
            and all(isinstance(side, int) and not isinstance(side, bool) for side in bucket)
            and min(bucket) > 0
        )
        if not ok:
            raise errors.ConfigError(
                f"data.buckets: bucket {bucket!r} is not a (height, width) pair of positive "
                "integers"
            )
        bucket = (int(bucket[0]), int(bucket[1]))
        if bucket in buckets:
            raise errors.ConfigError(f"data.buckets: bucket {bucket} is listed twice")
        buckets.append(bucket)
    return tuple(buckets)


def check_multiple(buckets: Sequence[Bucket], multiple: int, why: str) -> None:
    """Raises `errors.ConfigError` naming the first bucket with a side not a multiple of
    `multiple` (what the model's downsampling needs, said in `why`)."""
    for height, width in buckets:
        if height % multiple or width % multiple:
            raise errors.ConfigError(
                f"data.buckets: bucket {height}x{width} (height x width) has a side that is "
                f"not a multiple of {multiple} ({why})"
            )


def nearest(height: int, width: int, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket nearest the aspect ratio of a `height` x `width` image."""
    ratio = math.log(height / width)
    distances = [abs(ratio - math.log(h / w)) for h, w in buckets]
    return int(np.argmin(distances))  # The first of equal distances.


def name(bucket: Bucket) -> str:
    """ "512x768": height x width, as the log lines write a bucket."""
    return f"{bucket[0]}x{bucket[1]}"


class BucketPlan:
    """Which bucket and which examples each global batch takes (see the module docstring).

    Args:
      assignment: the bucket index of every example.
      num_buckets: how many buckets there are.
      global_batch_size: rows per global batch.
      seed: the run's seed.
    """

    def __init__(self, assignment: np.ndarray, num_buckets: int, global_batch_size: int, seed: int):
        self.assignment = np.asarray(assignment, np.int64)
        self.num_buckets = num_buckets
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.counts = np.bincount(self.assignment, minlength=num_buckets)
        self.batches_per_epoch = self.counts // global_batch_size
        self.steps_per_epoch = int(self.batches_per_epoch.sum())
        if self.steps_per_epoch == 0:
            raise errors.ConfigError(
                f"no bucket holds a whole batch of train.batch_size={global_batch_size} "
                f"(images per bucket: {self.counts.tolist()}); lower the batch size or use "
                "fewer buckets"
            )
        self._epoch: tuple[int, list[tuple[int, np.ndarray]]] | None = None

    @property
    def used(self) -> list[int]:
        """The buckets that batches are drawn from (those holding at least one batch)."""
        return [int(b) for b in np.flatnonzero(self.batches_per_epoch)]

    def _batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(bucket, example indices) of every batch of `epoch`, in the order they are taken."""
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.assignment))
        batches = []
        for bucket in range(self.num_buckets):
            members = order[self.assignment[order] == bucket]
            for k in range(self.batches_per_epoch[bucket]):
                rows = members[k * self.global_batch_size : (k + 1) * self.global_batch_size]
                batches.append((bucket, rows))
        taken = np.random.default_rng([self.seed, _BUCKET_ORDER_STREAM, epoch]).permutation(
            len(batches)
        )
        batches = [batches[i] for i in taken]
        self._epoch = (epoch, batches)
        return batches

    def batch(self, step: int) -> tuple[int, np.ndarray]:
        """(bucket index, the global batch's example indices) of `step`."""
        epoch, index = divmod(step, self.steps_per_epoch)
        return self._batches(epoch)[index]
