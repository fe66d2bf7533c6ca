"""The negatives store: images the frozen base model generates for the training captions.

NSYNC's negatives are made once, before training, by the base model from the positives'
captions with the style word replaced by the initializer word ("{caption} in the style
of painting"), and paired with the positives by example id. A store is a folder:

    <path>/settings.json      what decides the pixels (model, scheduler, steps, guidance,
                              template, size, seed, K); a rerun with others is an error
    <path>/images/<id>_<k>.png
    <path>/manifest.jsonl     one line per finished image: id, k, file, caption, prompt,
                              image seed; appended only after the PNG is in place

Generation is resumable and idempotent: a PNG is written to a temporary name and renamed,
its manifest line is appended afterwards, and a rerun skips every (id, k) already in the
manifest. An interruption leaves at most PNGs without a line (regenerated, identically)
and a partial last line (dropped). Image (id, k)'s noise folds a stable hash of id and k
into `negatives.seed`, so its pixels do not depend on batching, devices or resumption.

In multi-host runs every process reads the (shared) store, takes its share of the work
and appends to its own `manifest-<process>.jsonl`; readers take all manifests.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from flax import traverse_util
from PIL import Image

from nsync_jax import models, runs, sampling
from nsync_jax.data import sources
from nsync_jax.data.examples import Examples, resize_and_crop

SETTINGS = "settings.json"
IMAGES = "images"
FORMAT_VERSION = 1


def image_seed(example_id: str, k: int) -> int:
    """A stable 32-bit seed for image k of example `example_id` (same across runs/hosts)."""
    digest = hashlib.sha256(f"{example_id}\x00{k}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def image_name(example_id: str, k: int) -> str:
    """File name of image (id, k); ids with characters unsafe in names get a hash suffix."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", example_id)
    if safe != example_id:
        safe += "-" + hashlib.sha256(example_id.encode()).hexdigest()[:8]
    return f"{safe}_{k}.png"


def store_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Every setting that decides a store's pixels; a store never mixes two of these."""
    model = config.model
    model_settings: dict[str, Any] = {
        "source": model.source,
        "resolution": model.resolution,
        "param_dtype": model.param_dtype,
        "compute_dtype": model.compute_dtype,
    }
    if model.source == "pretrained":
        model_settings.update(pretrained=model.pretrained, revision=model.revision)
    else:  # Random weights: the architecture and the init seed decide them.
        model_settings.update(tiny=model.tiny.to_dict(), init_seed=config.seed)
    if model.init_from:  # A trained run is the base: its workdir names its weights.
        model_settings.update(init_from=os.path.abspath(model.init_from))
    neg = config.negatives
    return {
        "format": FORMAT_VERSION,
        "model": model_settings,
        "prompt_template": neg.prompt_template,
        "per_example": neg.per_example,
        "scheduler": neg.scheduler,
        "num_steps": neg.num_steps,
        "guidance_scale": float(neg.guidance_scale),
        "negative_prompt": neg.negative_prompt,
        "size": neg.size,
        "seed": neg.seed,
    }


def _flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """Nested JSON objects as {"group.field": value}, for naming differing fields."""
    return traverse_util.flatten_dict(tree, sep=".")


def check_settings(path: str, settings: dict[str, Any]) -> None:
    """Raises ValueError naming every setting in which the store at `path` differs."""
    with open(os.path.join(path, SETTINGS)) as f:
        stored = _flatten(json.load(f))
    wanted = _flatten(json.loads(json.dumps(settings)))
    differing = [
        f"{key}: store has {stored.get(key)!r}, config has {wanted.get(key)!r}"
        for key in sorted(set(stored) | set(wanted))
        if stored.get(key) != wanted.get(key)
    ]
    if differing:
        raise ValueError(
            f"negatives store {path} was made with other settings; use another "
            "negatives.path or the store's settings. Differences:\n  " + "\n  ".join(differing)
        )


def _write_atomic(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _manifest_name(process_index: int) -> str:
    return "manifest.jsonl" if process_index == 0 else f"manifest-{process_index}.jsonl"


def _read_manifest_file(path: str, repair: bool) -> list[dict[str, Any]]:
    """Lines of one manifest; a partial last line (a crash mid-append) is dropped.

    With `repair`, the partial line is also cut from the file so appends start clean.
    """
    with open(path, "rb") as f:
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    if repair and len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    entries = []
    for number, line in enumerate(complete.decode().splitlines(), start=1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not valid JSON: {e}") from e
    return entries


def read_manifest(path: str, repair: bool = False) -> dict[tuple[str, int], dict[str, Any]]:
    """Finished images of the store at `path`: {(id, k): manifest entry}."""
    entries: dict[tuple[str, int], dict[str, Any]] = {}
    for name in sorted(glob.glob(os.path.join(path, "manifest*.jsonl"))):
        for entry in _read_manifest_file(name, repair):
            entries[(entry["id"], entry["k"])] = entry  # A repeat is the same image.
    return entries


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What one `generate_store` call did."""

    path: str
    generated: int  # Images made by this call (this process).
    total: int  # Images the store should hold (positives × K).
    complete: bool  # Whether every (id, k) is now in the manifest.


def _validate(config: ml_collections.ConfigDict) -> None:
    neg = config.negatives
    if not neg.path:
        raise ValueError("negatives.path is empty: set the store folder to write")
    if "{caption}" not in neg.prompt_template:
        raise ValueError(f"negatives.prompt_template {neg.prompt_template!r} has no {{caption}}")
    if neg.per_example < 1:
        raise ValueError(f"negatives.per_example must be >= 1, got {neg.per_example}")
    if neg.size < 0:
        raise ValueError(f"negatives.size must be >= 0, got {neg.size}")
    sampling.SamplerSettings.from_config(neg)  # Scheduler, steps and guidance checks.


def generate_store(
    config: ml_collections.ConfigDict,
    max_images: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    model_and_params: tuple[models.StableDiffusion, sampling.Params] | None = None,
) -> GenerationResult:
    """Generates the missing negatives of `config.data`'s positives into `negatives.path`.

    Args:
      config: a full run config (`model`, `data`, `negatives`, `mesh`, `seed`).
      max_images: stop after this many new images (all processes together); None for all.
      devices: devices of the mesh; all by default.
      model_and_params: the base model if already built; else built from `config`
        (only when there is work to do).

    Returns:
      What was generated and whether the store is complete.
    """
    _validate(config)
    neg = config.negatives
    path = neg.path
    settings = store_settings(config)
    process, processes = jax.process_index(), jax.process_count()
    os.makedirs(os.path.join(path, IMAGES), exist_ok=True)
    if os.path.exists(os.path.join(path, SETTINGS)):
        check_settings(path, settings)
    elif process == 0:

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(settings, f, indent=2)

        _write_atomic(os.path.join(path, SETTINGS), write)

    if process == 0:
        # Temporaries of an interrupted run. Safe: no process can finish a batch (and
        # write) before every process, this one included, has joined the first.
        for stale in glob.glob(os.path.join(path, IMAGES, "*.tmp-*")):
            os.remove(stale)
    positives = sources.load_positives(config.data, config.model.resolution)
    done = read_manifest(path, repair=True)
    captions = dict(zip(positives.ids, positives.captions, strict=True))
    prompts = {i: neg.prompt_template.format(caption=c) for i, c in captions.items()}
    for (example_id, k), entry in done.items():
        if example_id in prompts and entry["prompt"] != prompts[example_id]:
            raise ValueError(
                f"negatives store {path} holds image {example_id!r} k={k} for prompt "
                f"{entry['prompt']!r}, but the data now gives {prompts[example_id]!r}; "
                "the captions changed: use a new negatives.path"
            )
    total = len(positives) * neg.per_example
    pending = [
        (example_id, k)
        for example_id in positives.ids
        for k in range(neg.per_example)
        if (example_id, k) not in done
    ]
    if max_images is not None:
        pending = pending[: max(0, max_images)]
    if not pending:
        complete = all((i, k) in done for i in positives.ids for k in range(neg.per_example))
        return GenerationResult(path, 0, total, complete)

    # Contiguous equal shares; every process runs the same number of batches.
    share = -(-len(pending) // processes)
    mine = pending[process * share : (process + 1) * share]
    logging.info(
        "negatives: %d of %d images to generate into %s (%d here)",
        len(pending),
        total,
        path,
        len(mine),
    )
    model, params = model_and_params or runs.build_base(config)
    sampler = sampling.make_sampler(config, neg, model, params, devices)
    manifest = open(os.path.join(path, _manifest_name(process)), "a")
    bar = tqdm.tqdm(total=len(mine), unit="img", desc="negatives", disable=process != 0)
    generated, start = 0, time.perf_counter()
    try:
        batches = sampler.iterate(
            [prompts[i] for i, _ in mine], [image_seed(i, k) for i, k in mine], pad_to=share
        )
        for offset, images in batches:
            for (example_id, k), image in zip(mine[offset:], images, strict=False):
                name = image_name(example_id, k)
                pixels = sampling.resize(sampling.to_uint8(image), neg.size)
                _write_atomic(
                    os.path.join(path, IMAGES, name),
                    lambda tmp, p=pixels: Image.fromarray(p).save(tmp, format="PNG"),
                )
                entry = {
                    "id": example_id,
                    "k": k,
                    "file": f"{IMAGES}/{name}",
                    "caption": captions[example_id],
                    "prompt": prompts[example_id],
                    "image_seed": image_seed(example_id, k),
                }
                manifest.write(json.dumps(entry) + "\n")
            manifest.flush()
            os.fsync(manifest.fileno())
            generated += len(images)
            bar.update(len(images))
            bar.set_postfix(images_per_s=f"{generated / (time.perf_counter() - start):.3g}")
    finally:
        bar.close()
        manifest.close()
    done = read_manifest(path)
    complete = all((i, k) in done for i in positives.ids for k in range(neg.per_example))
    return GenerationResult(path, generated, total, complete)


def _load_png(path: str, resolution: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()  # Decodes now, so a truncated file fails here, named.
            return resize_and_crop(image, resolution)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"negative image {path} is missing") from e
    except (OSError, Image.UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"negative image {path} is not a readable PNG: {e}") from e


def load_store(
    path: str, resolution: int, k: int = 0, ids: Sequence[str] | None = None
) -> Examples:
    """The store's images number `k` as `Examples` with the positives' ids.

    Image (id, k) becomes example `id`, so `PairedBatches` pairs it with positive `id`.
    Images are resized and centre-cropped to `resolution` as positives are.

    Args:
      path: the store folder.
      resolution: training resolution.
      k: which of the K images per example (`negatives.pair_k`).
      ids: the ids to load (e.g. the positives'); all of the store's by default.

    Raises:
      FileNotFoundError: no store at `path`, or an image file is missing.
      KeyError: an id in `ids` has no image k.
      ValueError: a PNG cannot be decoded, or `k` is out of the store's range.
    """
    if not os.path.exists(os.path.join(path, SETTINGS)):
        raise FileNotFoundError(
            f"no negatives store at {path!r} (no {SETTINGS}); make one with "
            "launch/generate_negatives.py"
        )
    with open(os.path.join(path, SETTINGS)) as f:
        per_example = json.load(f)["per_example"]
    if not 0 <= k < per_example:
        raise ValueError(f"negatives.pair_k={k} but the store at {path} has {per_example} per id")
    entries = {i: e for (i, kk), e in read_manifest(path).items() if kk == k}
    if ids is None:
        ids = sorted(entries)
    if not ids:
        raise ValueError(f"negatives store {path} holds no images")
    missing = [i for i in ids if i not in entries]
    if missing:
        raise KeyError(
            f"negatives store {path} has no image k={k} for example {missing[0]!r} "
            f"({len(missing)} missing); finish it with launch/generate_negatives.py"
        )
    images = np.stack([_load_png(os.path.join(path, entries[i]["file"]), resolution) for i in ids])
    return Examples(tuple(ids), images, tuple(entries[i]["caption"] for i in ids))
