"""Deterministic paired batches of positives and their negatives.

The batch of step s is a pure function of (seed, s): the example stream is a concatenation
of per-epoch permutations, step s takes stream positions [s·B, (s+1)·B), and each process
keeps its contiguous slice of those rows. So the iterator's whole position is the step
number, which the checkpoint already holds, and a resumed run reads exactly the batches
an uninterrupted one would. Negatives are paired with positives by example id.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from nsync_jax.data.examples import Examples


def _to_pixels(images: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """uint8 NHWC → float32 NCHW in [-1, 1], flipping rows where `flip` is set."""
    images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    pixels = images.astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


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
    """

    def __init__(
        self,
        positives: Examples,
        negatives: Examples | None,
        tokenize: Callable[[list[str]], np.ndarray],
        prompt_template: str,
        style_token: str,
        global_batch_size: int,
        seed: int,
        random_flip: bool,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size % self.process_count:
            raise ValueError(
                f"batch size {global_batch_size} does not split over {self.process_count} processes"
            )
        if len(positives) == 0:
            raise ValueError("the style set is empty")
        self.positives = positives
        self.negatives = None if negatives is None else negatives.select(positives.ids)
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // self.process_count
        self.seed = seed
        self.random_flip = random_flip
        prompts = [prompt_template.format(caption=c, style=style_token) for c in positives.captions]
        self.prompts = tuple(prompts)
        self.input_ids = np.asarray(tokenize(prompts), np.int32)

    def __len__(self) -> int:
        return len(self.positives)

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

    def _flips(self, start: int, count: int, branch: int) -> np.ndarray:
        if not self.random_flip:
            return np.zeros(count, bool)
        rng = np.random.default_rng([self.seed, 1 + branch, start])
        return rng.random(count) < 0.5

    def batch(self, step: int) -> dict[str, dict[str, np.ndarray]]:
        """This process's rows of the global batch of `step`."""
        first = step * self.global_batch_size + self.process_index * self.local_batch_size
        rows = self._stream(first, self.local_batch_size)
        branches = {"positive": self.positives}
        if self.negatives is not None:
            branches["negative"] = self.negatives
        out = {}
        for branch, (name, examples) in enumerate(branches.items()):
            flips = self._flips(first, self.local_batch_size, branch)
            out[name] = {
                "pixels": _to_pixels(examples.images[rows], flips),
                "input_ids": self.input_ids[rows],
            }
        return out
