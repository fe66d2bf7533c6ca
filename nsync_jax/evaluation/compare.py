"""Comparing a generated image set with a real one: the metrics chosen by `config.eval`.

`compare(real, generated, eval_config, mesh)` builds each embedder the chosen metrics need
(CSD, CMMD's CLIP, Inception v3 once for both KID and FID), embeds both sets in batches
sharded over the mesh, and returns a flat report: the metric values plus what they were
computed with (set sizes, KID subset size, Inception variant, weight paths).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from nsync_jax import sharding
from nsync_jax.evaluation import clip_embed, images, inception, metrics

METRICS = ("csd", "cmmd", "kid", "fid")
# Which embedder each metric reads; KID and FID share one Inception pass.
EMBEDDER_OF = {"csd": "csd", "cmmd": "cmmd", "kid": "inception", "fid": "inception"}
# The report's metric values (the rest are settings): what goes to TensorBoard.
SCALARS = ("csd", "cmmd", "kid_mean", "kid_std", "fid", "fid_bootstrap_mean", "fid_bootstrap_std")


@dataclasses.dataclass(frozen=True)
class Embedder:
    """A jittable `apply(params, pixels) -> (batch, dim)` plus its per-image preprocessing."""

    name: str
    apply: Callable[[Any, jax.Array], jax.Array]
    params: Any
    preprocess: Callable[[Any], np.ndarray]  # PIL image -> (size, size, 3) float32.


def csd_embedder(path: str) -> Embedder:
    encoder, params = clip_embed.load_csd(path)
    size = encoder.config.image_size
    return Embedder(
        "csd",
        lambda p, x: encoder.apply({"params": p}, x),
        params,
        lambda im: images.csd_preprocess(im, size),
    )


def cmmd_embedder(path: str) -> Embedder:
    encoder, params = clip_embed.load_hf(path, "cmmd")
    size = encoder.config.image_size
    return Embedder(
        "cmmd",
        lambda p, x: encoder.apply({"params": p}, x),
        params,
        lambda im: images.cmmd_preprocess(im, size),
    )


def inception_embedder(path: str, variant: str) -> Embedder:
    params = inception.load_params(path, variant)
    model = inception.InceptionV3(variant)
    return Embedder(
        f"inception ({variant})",
        lambda p, x: model.apply({"params": p}, x),
        params,
        lambda im: inception.preprocess(im, variant),
    )


def build_embedder(kind: str, eval_config: ml_collections.ConfigDict) -> Embedder:
    if kind == "csd":
        return csd_embedder(eval_config.csd_weights)
    if kind == "cmmd":
        return cmmd_embedder(eval_config.cmmd_weights)
    if kind == "inception":
        return inception_embedder(eval_config.inception_weights, eval_config.inception_variant)
    raise ValueError(f"unknown embedder {kind!r}")


def embed(
    embedder: Embedder,
    image_set: Sequence[images.ImageLike],
    batch_size: int,
    mesh: Mesh,
    desc: str = "",
) -> np.ndarray:
    """Embeddings of every image, in order, in batches sharded over all mesh devices.

    The batch is rounded up to a multiple of the device count and the last batch padded
    with copies of its first image, so one executable serves every batch; padded rows are
    dropped and the count is checked, so no image is lost or repeated.
    """
    if not image_set:
        raise ValueError(f"{embedder.name}: empty image set {desc!r}")
    divisor = sharding.batch_divisor(mesh)
    batch = max(divisor, -(-batch_size // divisor) * divisor)
    params = jax.device_put(embedder.params, sharding.replicated(mesh))
    apply = jax.jit(
        embedder.apply,
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )
    outputs = []
    starts = range(0, len(image_set), batch)
    for start in tqdm(starts, desc=f"{embedder.name} {desc}".strip(), unit="batch"):
        chunk = image_set[start : start + batch]
        pixels = np.stack([embedder.preprocess(images.load_rgb(im)) for im in chunk])
        if len(chunk) < batch:
            pad = np.repeat(pixels[:1], batch - len(chunk), axis=0)
            pixels = np.concatenate([pixels, pad])
        out = apply(params, jax.device_put(pixels, sharding.batch_sharding(mesh)))
        outputs.append(np.asarray(jax.device_get(out))[: len(chunk)])
    result = np.concatenate(outputs).astype(np.float64)
    if len(result) != len(image_set):
        raise AssertionError(f"{embedder.name}: embedded {len(result)} of {len(image_set)}")
    return result


def _check_metrics(names: Sequence[str]) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"eval.metrics={names!r}: choose from {METRICS}")
    return names


def compare(
    real: Sequence[images.ImageLike],
    generated: Sequence[images.ImageLike],
    eval_config: ml_collections.ConfigDict,
    mesh: Mesh,
    embedders: dict[str, Embedder] | None = None,
) -> dict[str, Any]:
    """The metrics of `eval_config.metrics` between two image sets.

    Args:
      real, generated: image paths, PIL images or uint8 HWC arrays.
      eval_config: the `eval` config group.
      mesh: devices to shard the embedders' batches over.
      embedders: prebuilt embedders by kind ("csd", "cmmd", "inception"), e.g. for tests;
        the rest are loaded from the configured weight paths.

    Returns:
      A flat dict: `csd`, `cmmd`, `kid_mean`, `kid_std`, `kid_subset_size`,
      `kid_subsets`, `fid` (and `fid_bootstrap_mean`/`_std`), `inception_variant`,
      `n_real`, `n_generated` and the weight paths used.
    """
    names = _check_metrics(eval_config.metrics)
    embedders = dict(embedders or {})
    report: dict[str, Any] = {"n_real": len(real), "n_generated": len(generated)}
    features: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    kinds = list(dict.fromkeys(EMBEDDER_OF[n] for n in names))
    for kind in kinds:  # Load every model first: a bad path fails before any embedding.
        if kind not in embedders:
            embedders[kind] = build_embedder(kind, eval_config)
    for kind in kinds:
        embedder = embedders[kind]
        features[kind] = (
            embed(embedder, real, eval_config.batch_size, mesh, "real"),
            embed(embedder, generated, eval_config.batch_size, mesh, "generated"),
        )
        report[f"{kind}_weights"] = getattr(eval_config, f"{kind}_weights")
    if "csd" in names:
        report["csd"] = metrics.csd_score(*features["csd"])
    if "cmmd" in names:
        report["cmmd"] = metrics.cmmd(*features["cmmd"])
    if "kid" in names or "fid" in names:
        report["inception_variant"] = eval_config.inception_variant
    if "kid" in names:
        kid = metrics.kid(
            *features["inception"],
            num_subsets=eval_config.kid_subsets,
            max_subset_size=eval_config.kid_max_subset_size,
            seed=eval_config.seed,
        )
        report.update(
            kid_mean=kid.mean,
            kid_std=kid.std,
            kid_subset_size=kid.subset_size,
            kid_subsets=kid.num_subsets,
        )
    if "fid" in names:
        report["fid"] = metrics.fid(*features["inception"])
        if eval_config.fid_bootstrap:
            mean, std = metrics.fid_bootstrap(
                *features["inception"], eval_config.fid_bootstrap, eval_config.seed
            )
            report.update(fid_bootstrap_mean=mean, fid_bootstrap_std=std)
            report["fid_bootstrap"] = eval_config.fid_bootstrap
    logging.info("evaluation: %s", report)
    return report


def compare_folders(
    eval_config: ml_collections.ConfigDict, mesh: Mesh, out_path: str = ""
) -> dict[str, Any]:
    """`compare` of `eval.real_dir` and `eval.generated_dir`; writes JSON to `out_path`."""
    report = compare(
        images.list_images(eval_config.real_dir),
        images.list_images(eval_config.generated_dir),
        eval_config,
        mesh,
    )
    report.update(real_dir=eval_config.real_dir, generated_dir=eval_config.generated_dir)
    if out_path and jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(report, f, indent=2)
    return report
