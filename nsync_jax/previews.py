"""Samples during training: what the model draws as it learns, at fixed prompts and seeds.

Every `sample.every` steps, from step 0 (the base) of a fresh run on, the current weights
(their EMA when `train.ema_decay > 0`) draw `sample.prompts` (default: `default_prompts`,
a few training prompts plus one caption the run never trains on), image j with image
seed j under `sample.seed`: the same noise at every step, so the grids form a
progression. Each grid goes to `WORKDIR/samples/<step>.png` (labelled tiles), to
TensorBoard as an image, and a line to `WORKDIR/samples/index.jsonl` (step, file,
prompts, seconds taken).

The sampler is compiled once, on the training mesh, beside the train step (which is not
recompiled); its parameters are swapped in at each call (`Sampler.set_params`, the same
shardings as training's, so nothing is copied between devices). The pause is logged.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from nsync_jax import loop, models, sampling

SAMPLES_DIR = "samples"
INDEX_FILE = "index.jsonl"
# A caption no style set here trains on: does the style carry over to new content?
UNSEEN_CAPTION = "a lighthouse on a rocky coast at dusk"
TRAINING_PROMPTS = 3
# Smaller tiles are enlarged to this side (px), so that the labels under them fit.
MIN_TILE = 128


def default_prompts(
    training_prompts: Sequence[str], prompt_template: str, style_token: str
) -> list[str]:
    """The first `TRAINING_PROMPTS` distinct training prompts and the unseen caption in
    the same template and style word."""
    prompts = list(dict.fromkeys(training_prompts))[:TRAINING_PROMPTS]
    unseen = prompt_template.format(caption=UNSEEN_CAPTION, style=style_token)
    return prompts + ([unseen] if unseen not in prompts else [])


def grid_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, SAMPLES_DIR, f"{step:06d}.png")


class Samples(loop.Hook):
    """Draws the prompts with the state's weights when due (every `every` steps).

    Args:
      sampler: compiled once; its parameters are swapped at each call.
      params_fn: the state -> full parameters to draw with (`{"unet", "vae",
        "text_encoder"}`, e.g. the scope's merge of the trainable and frozen ones).
      prompts: drawn in this order, image j with image seed j.
      workdir: where `samples/` goes.
      writer: a `metrics.MetricWriter` (the grid also goes to TensorBoard).
      every: steps between calls.
      tile: side of each tile in the grid (px); 0: the model's, at least `MIN_TILE`.
    """

    on_stop = False  # A stop saves and exits; it does not wait for pictures.

    def due(self, step: int, last: bool, stopping: bool) -> bool:
        # Not forced at the last step: the grids stay on one grid of steps.
        return bool(self.every) and step % self.every == 0

    def __init__(
        self,
        sampler: sampling.Sampler,
        params_fn: Callable[[Any], models.Params],
        prompts: Sequence[str],
        workdir: str,
        writer: Any,
        every: int,
        tile: int = 0,
    ):
        self.sampler, self.params_fn, self.tile = sampler, params_fn, tile
        self.prompts = list(prompts)
        self.workdir, self.writer, self.every = workdir, writer, every

    def __call__(self, step: int, state: Any) -> None:
        tick = time.perf_counter()
        self.sampler.set_params(self.params_fn(state))
        images = sampling.generate_all_processes(
            self.sampler, self.prompts, list(range(len(self.prompts))), progress_bar=False
        )
        seconds = time.perf_counter() - tick
        if jax.process_index() != 0:
            return
        path = grid_path(self.workdir, step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        side = self.tile or max(images.shape[1], MIN_TILE)
        grid = sampling.labelled_grid([sampling.resize(i, side) for i in images], self.prompts)
        grid.save(path)
        self.writer.write_image(step, "samples", np.asarray(grid))
        with open(os.path.join(self.workdir, SAMPLES_DIR, INDEX_FILE), "a") as f:
            record = {"step": step, "file": os.path.basename(path), "seconds": seconds}
            f.write(json.dumps({**record, "prompts": self.prompts}) + "\n")
        logging.info("samples of step %d: %s (%.1f s)", step, path, seconds)


def make_samples_hook(
    config: ml_collections.ConfigDict,
    trainer: Any,
    workdir: str,
    writer: Any,
    params_fn: Callable[[Any], models.Params],
) -> Samples:
    """The hook for `train.py`: `config.sample` settings on the training mesh."""
    prompts = list(config.sample.prompts) or default_prompts(
        trainer.batches.prompts, config.train.prompt_template, config.train.style_token
    )
    sampler = sampling.Sampler(
        trainer.model,
        params_fn(trainer.state),
        trainer.mesh,
        sampling.SamplerSettings.from_config(config.sample),
        seed=config.sample.seed,
        batch_per_device=config.sample.batch_per_device,
    )
    return Samples(
        sampler, params_fn, prompts, workdir, writer, config.sample.every, config.sample.size
    )
