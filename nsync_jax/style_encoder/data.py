"""The batches of the three stages: pixels, the spliced prompt's ids, the example index.

The batch of step s is a pure function of (seed, s), as in `data/pipeline.py`, so the
checkpointed step is the whole iterator position. Two orders:

- `chunks` (stage 1, the paper's per-image inversion): a fixed permutation of the images
  cut into batches; batch c is served for `steps_per_batch` consecutive steps, then batch
  c + 1 (a last, short batch is filled from the start of the permutation). Each image's
  vectors are trained on its own batch only.
- `epochs` (stages 2 and 3): a fresh permutation each epoch, the stream cut into batches.

`index` is each row's example index: stage 1 gathers (and writes back) those rows of the
bank, stage 2 reads them as targets.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from nsync_jax.data.examples import ExampleSet, sha256_json, to_pixels

ORDERS = ("chunks", "epochs")


class StyleBatches:
    """This process's rows of each global batch.

    Args:
      examples: the images with their content captions.
      tokenize: prompts -> int token ids [N, L]; None serves no `input_ids` (stage 2).
      prompt_template: e.g. "{caption}, in the style of {style}.".
      placeholder: what `{style}` becomes ("sks").
      global_batch_size: rows per step across all processes.
      seed: the order's seed.
      order: "chunks" or "epochs" (module doc).
      steps_per_batch: `chunks` only: steps each batch is served for.
      process_index, process_count: this host's slice; default jax's.
    """

    def __init__(
        self,
        examples: ExampleSet,
        tokenize: Callable[[list[str]], np.ndarray] | None,
        prompt_template: str,
        placeholder: str,
        global_batch_size: int,
        seed: int,
        order: str,
        steps_per_batch: int = 1,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if order not in ORDERS:
            raise ValueError(f"order={order!r} is not one of {ORDERS}")
        if len(examples) < global_batch_size:
            raise ValueError(
                f"{len(examples)} images for a batch of {global_batch_size}: the style set "
                "needs at least a batch of distinct images"
            )
        if steps_per_batch < 1:
            raise ValueError(f"steps_per_batch must be >= 1, got {steps_per_batch}")
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size % self.process_count:
            raise ValueError(
                f"batch size {global_batch_size} does not split over {self.process_count} processes"
            )
        self.examples = examples
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // self.process_count
        self.seed, self.order, self.steps_per_batch = seed, order, steps_per_batch
        self.prompts = tuple(
            prompt_template.format(caption=c, style=placeholder) for c in examples.captions
        )
        self.input_ids = None
        if tokenize is not None:
            self.input_ids = np.asarray(tokenize(list(self.prompts)), np.int32)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def batches_per_pass(self) -> int:
        """Batches that visit every image once (the last may be filled from the start)."""
        return math.ceil(len(self) / self.global_batch_size)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self))

    def rows(self, step: int) -> np.ndarray:
        """The example indices of the global batch of `step`."""
        n, b = len(self), self.global_batch_size
        if self.order == "chunks":
            chunk = (step // self.steps_per_batch) % self.batches_per_pass
            return self._permutation(0)[(chunk * b + np.arange(b)) % n]
        positions = step * b + np.arange(b)
        return np.asarray([self._permutation(int(p // n))[p % n] for p in positions])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of step `step`: `pixels` NCHW in [-1, 1], `input_ids`,
        `index`. A bad image raises `BadImageError` naming it."""
        first = self.process_index * self.local_batch_size
        rows = self.rows(step)[first : first + self.local_batch_size]
        images = np.stack([self.examples.image(int(r)) for r in rows])
        batch = {"pixels": to_pixels(images), "index": rows.astype(np.int32)}
        if self.input_ids is not None:
            batch["input_ids"] = self.input_ids[rows]
        return batch

    def fingerprint(self) -> dict[str, Any]:
        """JSON values identifying the data and the order (no image decoded); `ids_sha256`
        ties stage 2 to the bank rows of stage 1."""
        fingerprint = {
            "num_examples": len(self),
            "ids_sha256": sha256_json(list(self.examples.ids)),
            "ids_and_prompts_sha256": sha256_json([list(self.examples.ids), list(self.prompts)]),
            "examples": self.examples.fingerprint(),
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "order": self.order,
            "steps_per_batch": self.steps_per_batch,
        }
        return json.loads(json.dumps(fingerprint))
