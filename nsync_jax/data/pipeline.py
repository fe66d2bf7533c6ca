"""Deterministic paired batches of positives and their negatives.

The batch of step s is a pure function of (seed, s): the example stream is a concatenation
of per-epoch permutations, step s takes stream positions [s·B, (s+1)·B), and each process
keeps its contiguous slice of those rows. So the iterator's whole position is the step
number, which the checkpoint already holds, a resumed run reads exactly the batches an
uninterrupted one would, and the batches do not depend on how many hosts share them.
Negatives are paired with positives by example id. Caption dropout gives a row of a
branch the empty prompt "" (what classifier-free guidance needs), drawn per branch from
(seed, step) for the whole global batch, so it too is part of the pure function.
A run of several styles (`styles.py`) gives each example its own style word in the prompt
and the positive branch a `label` row.

With aspect-ratio buckets (`data/buckets.py`) each global batch is drawn from one bucket
instead, by `BucketPlan`, again a pure function of (seed, s); each image (and the negative
paired with it) is resized and cropped to its batch's bucket.

Images are read lazily: a host decodes only the rows of its slice (sets from `folder.py`
and `tfds_source.py` cache each decoded image after its first read). With cached latents
(`data/latents.py`) a branch yields its VAE posterior moments instead of pixels.

A bad image (unreadable, corrupt) raises `BadImageError` naming it; with
`on_bad_image="skip"` its example is replaced, wherever the stream draws it, by the next
readable example in id order (with buckets, resized to the batch's bucket whatever its
own). That rule depends only on the data, so every host makes the same substitution
without talking to the others and the purity in (seed, s) holds.

`fingerprint()` is what a checkpoint records of the data (and refuses a resume on other
data with): each branch's own fingerprint (file sizes and times, dataset versions, never
decoded pixels), the ids and prompts, the global batch size, seed and flipping, and the
buckets when there are any (a fingerprint without buckets is as before they existed).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from nsync_jax.data import buckets as buckets_lib
from nsync_jax.data.examples import BadImageError, ExampleSet, sha256_json, to_pixels
from nsync_jax.data.latents import LatentCache, MomentsFn, build_latent_cache
from nsync_jax.data.styles import StyleIndex

ON_BAD_IMAGE = ("error", "skip")
# First word of the caption-dropout draws' seed after the run's seed (flips use 1 and 2).
_CAPTION_DROPOUT_STREAM = 3


class PairedBatches:
    """This process's share of each global batch, positives and (optionally) negatives.

    Args:
      positives: style images with captions.
      negatives: images generated for the same ids, or None for plain fine-tuning.
      tokenize: list of prompts -> int token ids [N, L].
      prompt_template: e.g. "{caption} in the style of {style}".
      style_token: what `{style}` becomes.
      global_batch_size: rows per branch across all processes.
      seed: shuffling and flip seed.
      random_flip: horizontal flips, drawn independently per branch.
      process_index, process_count: this host's slice; default jax's.
      on_bad_image: "error" or "skip" (see the module docstring).
      caption_dropout: probability that a row's prompt is the empty prompt "" instead,
        drawn per branch and row (see `_dropped`).
      buckets: (height, width) aspect-ratio buckets (`data/buckets.py`); () serves square
        images at the sets' resolution, in the plain stream. Sizes are read at start
        (`ExampleSet.size`: file headers, no decoding).
      styles: each example's style word and label (`styles.StyleIndex`, a run of several
        styles): `{style}` becomes the example's own word instead of `style_token`, and
        the positive branch carries a `label` row (int32 [B]).
      view_template: a second prompt template; the positive branch then also carries its
        token ids as `input_ids_view` (the second caption of a contrastive view).
    """

    def __init__(
        self,
        positives: ExampleSet,
        negatives: ExampleSet | None,
        tokenize: Callable[[list[str]], np.ndarray],
        prompt_template: str,
        style_token: str,
        global_batch_size: int,
        seed: int,
        random_flip: bool,
        process_index: int | None = None,
        process_count: int | None = None,
        on_bad_image: str = "error",
        caption_dropout: float = 0.0,
        buckets: Sequence[buckets_lib.Bucket] = (),
        styles: StyleIndex | None = None,
        view_template: str | None = None,
    ):
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size % self.process_count:
            raise ValueError(
                f"batch size {global_batch_size} does not split over {self.process_count} processes"
            )
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"data.on_bad_image={on_bad_image!r} is not one of {ON_BAD_IMAGE}")
        if len(positives) == 0:
            raise ValueError("the style set is empty")
        if not 0 <= caption_dropout < 1:
            raise ValueError(f"data.caption_dropout must be in [0, 1), got {caption_dropout}")
        self.positives = positives
        self.negatives = None if negatives is None else negatives.select(positives.ids)
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // self.process_count
        self.seed = seed
        self.random_flip = random_flip
        self.on_bad_image = on_bad_image
        self.bad: set[int] = set()  # Example indices found unreadable (on either branch).
        self.latents: dict[str, LatentCache] | None = None
        self.labels = None
        tokens = (style_token,) * len(positives)
        if styles is not None:
            tokens, self.labels = styles.of(positives.ids)
        prompts = [
            prompt_template.format(caption=c, style=t)
            for c, t in zip(positives.captions, tokens, strict=True)
        ]
        self.prompts = tuple(prompts)
        self.input_ids = np.asarray(tokenize(prompts), np.int32)
        self.view_prompts = self.view_ids = None
        if view_template is not None:
            self.view_prompts = tuple(
                view_template.format(caption=c, style=t)
                for c, t in zip(positives.captions, tokens, strict=True)
            )
            self.view_ids = np.asarray(tokenize(list(self.view_prompts)), np.int32)
        self.caption_dropout = caption_dropout
        if caption_dropout:
            self.empty_ids = np.asarray(tokenize([""]), np.int32)[0]
        self.buckets = tuple(tuple(b) for b in buckets)
        self.plan = None
        if self.buckets:
            self.plan = buckets_lib.BucketPlan(
                self._assign(), len(self.buckets), global_batch_size, seed
            )
            self._log_buckets()

    def _assign(self) -> np.ndarray:
        """The nearest bucket of every positive, from its stored size (no pixel decoded
        where the source reads headers). An image whose size cannot be read is bad; it is
        counted in the first bucket but never served (`_row` substitutes a readable one)."""
        assignment = np.zeros(len(self.positives), np.int64)
        for i in range(len(self.positives)):
            try:
                height, width = self.positives.size(i)
            except BadImageError as e:
                self._mark_bad(i, e)
                continue
            assignment[i] = buckets_lib.nearest(height, width, self.buckets)
        return assignment

    def _log_buckets(self) -> None:
        per_bucket = zip(self.buckets, self.plan.counts, self.plan.batches_per_epoch, strict=True)
        logging.info(
            "aspect-ratio buckets (height x width: images): %s; %d steps per epoch",
            ", ".join(f"{buckets_lib.name(b)}: {n}" for b, n, _ in per_bucket),
            self.plan.steps_per_epoch,
        )
        unused = [
            buckets_lib.name(b)
            for b, n, k in zip(
                self.buckets, self.plan.counts, self.plan.batches_per_epoch, strict=True
            )
            if n and not k
        ]
        if unused:
            logging.warning(
                "buckets %s hold fewer images than a batch (train.batch_size=%d): their "
                "images are never trained on",
                unused,
                self.global_batch_size,
            )

    @property
    def bucket_shapes(self) -> list[buckets_lib.Bucket]:
        """The (height, width) of the buckets batches are drawn from; [] without buckets."""
        return [] if self.plan is None else [self.buckets[b] for b in self.plan.used]

    def __len__(self) -> int:
        return len(self.positives)

    def with_seed(self, seed: int) -> PairedBatches:
        """The same batches (data, caches, settings) in the order and flips of `seed`."""
        other = copy.copy(self)
        other.seed = seed
        other.bad = set(self.bad)
        if self.plan is not None:
            other.plan = buckets_lib.BucketPlan(
                self.plan.assignment, len(self.buckets), self.global_batch_size, seed
            )
        return other

    def fingerprint(self) -> dict[str, Any]:
        """JSON values identifying the training data; no image is decoded.

        The batch of step s is a pure function of (seed, s) and these examples, so this
        plus the step is the iterator's whole position.
        """
        fingerprint = {
            "num_examples": len(self.positives),
            "ids_and_prompts_sha256": sha256_json([list(self.positives.ids), list(self.prompts)]),
            "positives": self.positives.fingerprint(),
            "negatives": None if self.negatives is None else self.negatives.fingerprint(),
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "random_flip": self.random_flip,
        }
        if self.buckets:
            fingerprint["buckets"] = self.buckets
        if self.labels is not None:  # Only then: one-style runs keep their fingerprint.
            fingerprint["labels_sha256"] = sha256_json(self.labels.tolist())
        if self.view_prompts is not None:
            fingerprint["view_prompts_sha256"] = sha256_json(list(self.view_prompts))
        # As the checkpoint's JSON gives it back (tuples become lists), so they compare.
        return json.loads(json.dumps(fingerprint))

    @property
    def branches(self) -> dict[str, ExampleSet]:
        out = {"positive": self.positives}
        if self.negatives is not None:
            out["negative"] = self.negatives
        return out

    def use_latents(self, caches: dict[str, LatentCache]) -> None:
        """Serve posterior moments from `caches` (one per branch) instead of pixels."""
        if self.buckets:
            raise ValueError("cached latents are square: they do not combine with buckets")
        if set(caches) != set(self.branches):
            raise ValueError(
                f"latent caches for {sorted(caches)}, branches {sorted(self.branches)}"
            )
        for name, cache in caches.items():
            if len(cache) != len(self):
                raise ValueError(f"{name} latent cache has {len(cache)} rows, data {len(self)}")
            self.bad |= {int(i) for i in np.flatnonzero(cache.bad)}
        self.latents = caches

    def _stream(self, start: int, count: int) -> np.ndarray:
        """Example indices at stream positions [start, start + count)."""
        n = len(self.positives)
        positions = np.arange(start, start + count)
        out = np.empty(count, np.int64)
        for epoch in np.unique(positions // n):
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
            here = positions // n == epoch
            out[here] = order[positions[here] % n]
        return out

    def _uniforms(self, seed_words: list[int]) -> np.ndarray:
        """This process's rows of a uniform draw for every row of the global batch, from
        `default_rng(seed_words)`: drawn whole, then sliced, so a row's draw depends neither
        on how many processes share the batch nor on what was drawn before."""
        offset = self.process_index * self.local_batch_size
        draw = np.random.default_rng(seed_words).random(self.global_batch_size)
        return draw[offset : offset + self.local_batch_size]

    def _flips(self, step: int, branch: int) -> np.ndarray:
        """This process's flips of `step` on `branch`."""
        if not self.random_flip:
            return np.zeros(self.local_batch_size, bool)
        return self._uniforms([self.seed, 1 + branch, step * self.global_batch_size]) < 0.5

    def _dropped(self, step: int, branch: int) -> np.ndarray:
        """Which of this process's rows of `step` get the empty prompt on `branch`."""
        words = [self.seed, _CAPTION_DROPOUT_STREAM + branch, step]
        return self._uniforms(words) < self.caption_dropout

    def _mark_bad(self, index: int, error: BadImageError) -> None:
        if self.on_bad_image == "error":
            raise error.refused() from error
        self.bad.add(index)
        logging.warning(
            "skipping bad image (%d skipped so far, data.on_bad_image='skip'): %s",
            len(self.bad),
            error,
        )
        if len(self.bad) == len(self):
            raise ValueError(f"every one of the {len(self)} examples has a bad image") from error

    def _row(self, index: int, size: tuple[int, int] | None) -> tuple[int, dict[str, np.ndarray]]:
        """(the example index served for `index`, its image per branch at `size`, or at
        the sets' resolution if None)."""
        n = len(self)
        for offset in range(n):
            candidate = (index + offset) % n
            if candidate in self.bad:
                continue
            if self.latents is not None:
                return candidate, {}
            try:
                images = {k: s.image(candidate, size) for k, s in self.branches.items()}
            except BadImageError as e:
                self._mark_bad(candidate, e)
                continue
            return candidate, images
        raise ValueError(f"every one of the {n} examples has a bad image")

    def batch(self, step: int) -> dict[str, dict[str, np.ndarray]]:
        """This process's rows of the global batch of `step`."""
        offset = self.process_index * self.local_batch_size
        if self.plan is None:
            size = None
            indices = self._stream(step * self.global_batch_size + offset, self.local_batch_size)
        else:
            bucket, rows = self.plan.batch(step)
            size = self.buckets[bucket]
            indices = rows[offset : offset + self.local_batch_size]
        served = [self._row(int(i), size) for i in indices]
        rows = np.asarray([r for r, _ in served])
        out = {}
        for branch, name in enumerate(self.branches):
            flips = self._flips(step, branch)
            if self.latents is not None:
                mean, std = self.latents[name].moments(rows, flips)
                out[name] = {"latent_mean": mean, "latent_std": std}
            else:
                images = np.stack([images[name] for _, images in served])
                out[name] = {"pixels": to_pixels(images, flips)}
            input_ids = self.input_ids[rows]
            if self.caption_dropout:
                dropped = self._dropped(step, branch)
                input_ids = np.where(dropped[:, None], self.empty_ids, input_ids)
            out[name]["input_ids"] = input_ids
            if name == "positive" and self.labels is not None:
                out[name]["label"] = self.labels[rows]
            if name == "positive" and self.view_ids is not None:
                out[name]["input_ids_view"] = self.view_ids[rows]
        return out

    def cache_latents(self, moments_fn: MomentsFn, batch_size: int, resolution: int) -> None:
        """Encodes both branches once (both flips; each host its share, all-gathered) and
        serves moments from then on."""
        caches = {
            name: build_latent_cache(
                examples,
                moments_fn,
                batch_size,
                self.on_bad_image,
                resolution,
                name,
                self.process_index,
                self.process_count,
            )
            for name, examples in self.branches.items()
        }
        self.use_latents(caches)
