"""The NSYNC evaluation protocol ("img2txt2img"): generate from a split's captions, compare.

For every caption of data split `split`, one image is generated with
`sample.prompt_template` ("{caption} in the style of {style}", style = `train.style_token`,
or under `data.styles` each example's style's token)
and the generated set is compared with the split's real images by the metrics of
`config.eval` (`compare.compare`). The generated PNGs, `prompts.jsonl`, `grid.png` and
`metrics.json` land in `out_dir`, with `real_vs_generated.png`: the first 16 captions'
real and generated images side by side.

`run_evaluation` is what `launch/evaluate.py` calls: it picks the model (a training run's
checkpoint, the base model, or an exported diffusers folder with its textual-inversion
embedding), the output folder (`<workdir>/eval/<step>/` for a run), records the model
source and the SHA-256 of every weight file in `metrics.json`, and writes the metric
values as `eval/<name>` scalars to the run's TensorBoard files and `metrics.jsonl`.

Real images are the files of `eval.real_dir` when it is set (the original test images,
as the paper compares), else the split's images as the data source yields them (resized
and centre-cropped to `model.resolution`). With `eval.generated_dir` set, nothing is
generated and that folder is compared instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image

from nsync_jax import models, runs, sampling, sharding, torch_files
from nsync_jax import scope as scope_lib
from nsync_jax.data import styles
from nsync_jax.data.examples import ImageSequence
from nsync_jax.evaluation import compare, images
from nsync_jax.evaluation import weights as weights_lib

GRID_FILE = "real_vs_generated.png"
GRID_PAIRS = 16  # Caption pairs shown in the grid.


def split_styled(config: ml_collections.ConfigDict, split: str):
    """The example set (captions; images decoded on demand) of data split `split`, and
    its `styles.StyleIndex` under `data.styles` (else None)."""
    from nsync_jax.data import sources

    # As sampling.split_prompts: the source reads its split field (each style's too).
    data_config = styles.with_split(config.data, split)
    return sources.load_styled(data_config, config.model.resolution)


def split_examples(config: ml_collections.ConfigDict, split: str):
    """The example set (captions; images decoded on demand) of data split `split`."""
    return split_styled(config, split)[0]


def prompts_for(template: str, captions: Sequence[str], style_token: str | Sequence[str]):
    """`template` over `captions`; `style_token` one word for all, or one per caption."""
    tokens = [style_token] * len(captions) if isinstance(style_token, str) else style_token
    return [template.format(caption=c, style=t) for c, t in zip(captions, tokens, strict=True)]


def pairs_grid(
    real: Sequence[images.ImageLike],
    generated: Sequence[images.ImageLike],
    captions: Sequence[str],
    limit: int = GRID_PAIRS,
) -> Image.Image:
    """Real and generated image i side by side (two pairs a row) for the first `limit`
    captions, each real tile labelled with its caption; tiles at the generated side."""
    count = min(limit, len(real), len(generated), len(captions))
    if count == 0:
        raise ValueError("no real/generated pairs to show")
    first = images.load_rgb(generated[0])
    side = first.width
    tiles, labels = [], []
    for i in range(count):
        for image in (real[i], generated[i]):
            tile = images.load_rgb(image)
            if tile.size != (side, side):
                tile = tile.resize((side, side), Image.Resampling.BICUBIC)
            tiles.append(np.asarray(tile))
        labels += [f"real: {captions[i]}", "generated"]
    return sampling.labelled_grid(tiles, labels, columns=4 if count > 1 else 2)


def weight_hashes(report: dict[str, Any]) -> dict[str, str]:
    """`{file: sha256}` of every configured metric weight file the report names.

    Paths are the configured ones (`<kind>_weights`); a folder contributes each weight
    file in it. Empty paths (embedders given prebuilt, in tests) contribute nothing.
    """
    hashed: dict[str, str] = {}
    result: dict[str, str] = {}
    for kind in dict.fromkeys(compare.EMBEDDER_OF.values()):
        path = report.get(f"{kind}_weights")
        if path:
            result.update(weights_lib.hash_weights(path, hashed))
    return result


def evaluate(
    config: ml_collections.ConfigDict,
    out_dir: str,
    split: str,
    model_and_params: tuple[models.StableDiffusion, Any] | None = None,
    style_token: str | None = None,
    embedders: dict[str, compare.Embedder] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generates one image per caption of `split` and reports the `config.eval` metrics.

    Args:
      config: the run's config (model, data, sample, train.style_token, eval, mesh).
      out_dir: where the generated images, the grid and `metrics.json` go.
      split: the data split whose captions and images are used (e.g. "testA").
      model_and_params: the model to sample (e.g. a `runs.load_trained` run's model and
        params); the base model when None.
      style_token: the words for "{style}" in the prompt; when None, each example's
        style's token under `data.styles`, else `config.train.style_token` (pass the
        trained run's token when sampling a run, an artist's name for the base-model
        baseline).
      embedders: prebuilt embedders by kind (tests); others load from `config.eval`.
      extra: more entries for the report (the model source, the step).

    Returns:
      The report of `compare.compare` plus the split, prompt template, sampler settings,
      folders and `weights_sha256` (`{file: sha256}` of the metric weight files).
    """
    examples, index = split_styled(config, split)
    if style_token is None:  # Each example's style's word under data.styles.
        tokens = styles.example_tokens(examples.ids, index, config.train.style_token)
        style_token = config.train.style_token if index is None else sorted(set(tokens))
    else:
        tokens = style_token
    if config.eval.generated_dir:
        generated = images.list_images(config.eval.generated_dir)
        generated_dir = config.eval.generated_dir
    else:
        generated_dir = os.path.join(out_dir, "generated")
        prompts = prompts_for(config.sample.prompt_template, examples.captions, tokens)
        logging.info("evaluation: generating %d images into %s", len(prompts), generated_dir)
        generated = sampling.sample_to_dir(
            config, prompts, generated_dir, 1, model_and_params=model_and_params
        )
    if jax.process_index() != 0:
        return {}  # Metrics run on process 0 only (sample_to_dir writes there).
    # A lazy set's images are decoded batch by batch as the embedders ask for them.
    real = (
        images.list_images(config.eval.real_dir)
        if config.eval.real_dir
        else ImageSequence(examples)
    )
    mesh_config = config.mesh
    if jax.process_count() > 1:  # config.mesh counts every process's devices.
        mesh_config = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    mesh = sharding.make_mesh(mesh_config, jax.local_devices())
    report = compare.compare(real, generated, config.eval, mesh, embedders)
    report.update(
        split=split,
        prompt_template=config.sample.prompt_template,
        style_token=style_token,
        num_images=len(generated),
        sample={
            k: config.sample[k]
            for k in ("scheduler", "num_steps", "guidance_scale", "negative_prompt", "seed", "size")
        },
        real_dir=config.eval.real_dir,
        generated_dir=generated_dir,
        weights_sha256=weight_hashes(report),
        **(extra or {}),
    )
    os.makedirs(out_dir, exist_ok=True)
    # The split's own images pair with its captions (eval.real_dir's order need not).
    pairs_grid(ImageSequence(examples), generated, examples.captions).save(
        os.path.join(out_dir, GRID_FILE)
    )
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def load_textual_inversion(
    model: models.StableDiffusion, params: Any, path: str
) -> tuple[models.StableDiffusion, Any, str]:
    """Adds the token of a diffusers `learned_embeds.safetensors` (`{token: [1, D]}`, as
    `nsync_jax.export` writes) to the tokenizer and text encoder; returns the token too."""
    from safetensors.numpy import load_file

    embeds = load_file(path)
    if len(embeds) != 1:
        raise ValueError(f"{path}: expected one token's embedding, found {sorted(embeds)}")
    ((token, row),) = embeds.items()
    row = np.asarray(row).reshape(1, -1)
    # The initial row is overwritten just below; the end-of-text token is in every CLIP vocab.
    model, params, token_id = scope_lib.add_placeholder_token(
        model, params, token, model.tokenizer.eos_token
    )
    table = params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    if row.shape[1] != table.shape[1]:
        raise ValueError(f"{path}: embedding width {row.shape[1]}, text encoder {table.shape[1]}")
    ti_scope = scope_lib.TextualInversionScope(token_id)
    return model, ti_scope.merge({"token_embedding": row}, params), token


@dataclasses.dataclass(frozen=True)
class ModelUnderTest:
    """What `run_evaluation` samples: model, params, its style token, step and source."""

    model: models.StableDiffusion
    params: Any
    style_token: str | None  # None: each example's style's token (data.styles).
    step: int | None
    source: dict[str, Any]


def load_model(
    config: ml_collections.ConfigDict, workdir: str | None = None, step: int | None = None
) -> ModelUnderTest:
    """A training run's checkpoint (`workdir`, `step`: newest if None), else `config.model`.

    `config.model` is the base model, or any exported pipeline folder
    (`model.source="pretrained"`, `model.pretrained=<export dir>`); a
    `learned_embeds.safetensors` in that folder (a textual-inversion export) is loaded and
    its token becomes the style token; the tokens of a several-style export (listed in
    `textual_inversion.json`) are all loaded, and each example gets its style's token
    from `data.styles` (an error without it).
    """
    if workdir:
        run = runs.load_trained(workdir, step)
        source = {
            "kind": "run",
            "workdir": os.path.abspath(workdir),
            "scope": run.config.train.scope,
            "model_source": run.config.model.source,
            "pretrained": run.config.model.pretrained,
            "weights": "ema" if run.ema else "raw",  # The EMA when the run kept one.
        }
        token = None if run.config.data.styles else run.config.train.style_token
        return ModelUnderTest(run.model, run.params, token, run.step, source)
    if step is not None:
        raise ValueError("--step needs --workdir (a training run)")
    model, params = runs.build_base(config)
    style_token = config.train.style_token
    source: dict[str, Any] = {"kind": "model", "model_source": config.model.source}
    if config.model.source == "pretrained":
        source["pretrained"] = config.model.pretrained
        embeds = os.path.join(config.model.pretrained, torch_files.EMBEDS_FILE)
        listed = _listed_tokens(config.model.pretrained)
        if listed:
            if not config.data.styles:
                raise ValueError(
                    f"{config.model.pretrained} holds {len(listed)} style tokens "
                    f"({', '.join(t['placeholder_token'] for t in listed)}): set data.styles "
                    "as the run that made it, so that each example gets its style's token"
                )
            paths = [os.path.join(config.model.pretrained, t["weight_name"]) for t in listed]
            for path in paths:
                model, params, _ = load_textual_inversion(model, params, path)
            style_token = None  # Each example's style's token.
            source.update(
                learned_embeds=paths,
                learned_embeds_sha256={p: weights_lib.sha256_file(p) for p in paths},
            )
            logging.info("evaluation: %d style tokens from %s", len(paths), config.model.pretrained)
        elif os.path.isfile(embeds):
            model, params, style_token = load_textual_inversion(model, params, embeds)
            source.update(
                learned_embeds=embeds, learned_embeds_sha256=weights_lib.sha256_file(embeds)
            )
            logging.info("evaluation: textual-inversion token %r from %s", style_token, embeds)
    return ModelUnderTest(model, params, style_token, None, source)


def _listed_tokens(folder: str) -> list[dict[str, str]]:
    """The tokens `textual_inversion.json` lists for a several-style export; [] if none."""
    path = os.path.join(folder, torch_files.EMBEDS_INFO_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f).get("tokens", [])


def run_evaluation(
    config: ml_collections.ConfigDict,
    split: str = "testA",
    workdir: str | None = None,
    step: int | None = None,
    out_dir: str | None = None,
    style: str | None = None,
    embedders: dict[str, compare.Embedder] | None = None,
) -> dict[str, Any]:
    """`launch/evaluate.py`: evaluate a run's checkpoint, the base model or an export.

    Args:
      config: sample, data and eval settings (and `model` when there is no `workdir`).
      split: the data split whose captions and images are used.
      workdir: a training run; its checkpoint `step` (newest if None) is sampled.
      step: checkpoint step of `workdir`.
      out_dir: output folder; default `<workdir>/eval/<step>/`, required without `workdir`.
      style: words for "{style}" in `sample.prompt_template` (e.g. "Claude Monet" for the
        base-model baseline); default the run's or export's token, else
        `train.style_token`.
      embedders: prebuilt embedders by kind (tests).

    Returns:
      The report also written to `<out_dir>/metrics.json`. With `workdir`, the metric
      values also go to the run's `metrics.jsonl` and TensorBoard as `eval/<name>` at the
      evaluated step.
    """
    if not workdir and not out_dir:
        raise ValueError("without a training run (workdir) an output folder (--out) is needed")
    under_test = load_model(config, workdir, step)
    if out_dir is None:
        out_dir = os.path.join(workdir, "eval", str(under_test.step))
    report = evaluate(
        config,
        out_dir,
        split,
        (under_test.model, under_test.params),
        style_token=under_test.style_token if style is None else style,
        embedders=embedders,
        extra={"step": under_test.step, "model": under_test.source},
    )
    if workdir and report:
        from nsync_jax.metrics import MetricWriter

        scalars = {f"eval/{k}": report[k] for k in compare.SCALARS if k in report}
        writer = MetricWriter(workdir)
        writer.write(under_test.step, scalars)
        writer.close()
    return report
