"""The NSYNC evaluation protocol ("img2txt2img"): generate from a split's captions, compare.

For every caption of data split `split`, one image is generated with
`sample.prompt_template` ("{caption} in the style of {style}", style = `train.style_token`)
and the generated set is compared with the split's real images by the metrics of
`config.eval` (`compare.compare`). The generated PNGs, `prompts.jsonl`, `grid.png` and
`metrics.json` land in `out_dir`.

Real images are the files of `eval.real_dir` when it is set (the original test images,
as the paper compares), else the split's images as the data source yields them (resized
and centre-cropped to `model.resolution`). With `eval.generated_dir` set, nothing is
generated and that folder is compared instead.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from nsync_jax import models, sampling, sharding
from nsync_jax.evaluation import compare, images


def split_examples(config: ml_collections.ConfigDict, split: str):
    """The `Examples` (images and captions) of data split `split`."""
    from nsync_jax.data import sources

    data_config = ml_collections.ConfigDict(config.data.to_dict())
    data_config.split = split  # As sampling.split_prompts: the source reads its split field.
    return sources.load_positives(data_config, config.model.resolution)


def prompts_for(template: str, captions: Sequence[str], style_token: str) -> list[str]:
    return [template.format(caption=c, style=style_token) for c in captions]


def evaluate(
    config: ml_collections.ConfigDict,
    out_dir: str,
    split: str,
    model_and_params: tuple[models.StableDiffusion, Any] | None = None,
    style_token: str | None = None,
    embedders: dict[str, compare.Embedder] | None = None,
) -> dict[str, Any]:
    """Generates one image per caption of `split` and reports the `config.eval` metrics.

    Args:
      config: the run's config (model, data, sample, train.style_token, eval, mesh).
      out_dir: where the generated images and `metrics.json` go.
      split: the data split whose captions and images are used (e.g. "testA").
      model_and_params: the model to sample (e.g. a `runs.load_trained` run's model and
        params); the base model when None.
      style_token: the word for "{style}" in the prompt; `config.train.style_token` when
        None (pass the trained run's token when sampling a run).
      embedders: prebuilt embedders by kind (tests); others load from `config.eval`.

    Returns:
      The report of `compare.compare` plus the split, prompt template and folders.
    """
    examples = split_examples(config, split)
    style_token = config.train.style_token if style_token is None else style_token
    if config.eval.generated_dir:
        generated = images.list_images(config.eval.generated_dir)
        generated_dir = config.eval.generated_dir
    else:
        generated_dir = os.path.join(out_dir, "generated")
        prompts = prompts_for(config.sample.prompt_template, examples.captions, style_token)
        logging.info("evaluation: generating %d images into %s", len(prompts), generated_dir)
        generated = sampling.sample_to_dir(
            config, prompts, generated_dir, 1, model_and_params=model_and_params
        )
    if jax.process_index() != 0:
        return {}  # Metrics run on process 0 only (sample_to_dir writes there).
    real = (
        images.list_images(config.eval.real_dir) if config.eval.real_dir else list(examples.images)
    )
    mesh = sharding.make_mesh(config.mesh, jax.local_devices())
    report = compare.compare(real, generated, config.eval, mesh, embedders)
    report.update(
        split=split,
        prompt_template=config.sample.prompt_template,
        style_token=style_token,
        real_dir=config.eval.real_dir,
        generated_dir=generated_dir,
    )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report
