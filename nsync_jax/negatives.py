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

`settings.json` is written only once the model is built, right before the first image
(so a failed first try, e.g. a wrong `model.pretrained`, leaves nothing that would refuse
the corrected command); an existing one is checked before any work.

Each positive is decoded before its negative is made, since a negative of an image that
cannot be trained on is wasted work and a silent mismatch. With `data.on_bad_image="error"`
a bad positive stops generation naming its file; with "skip" no negative is made for it
and its manifest gets a line `{"id", "k", "caption", "prompt", "bad": reason}` with no
file. The reader (`data/negatives_store.py`) turns that line into a bad image, so training
with "skip" drops the example like any bad image, while an id with no line at all stays an
error (an unfinished store). A rerun decodes such positives again and makes their
negatives if they have been fixed.

In multi-host runs every process runs the same command: they check that they share the
config and the store folder (`hosts`), every process reads the store and decodes the
positives still to do, takes a contiguous share of the work (all run the same number of
batches) and appends to its own manifest (`manifest.jsonl` on process 0,
`manifest-<process>.jsonl` on the others); readers take all manifests. Each image is made
by exactly one process, with the same seed as on one process. Reading a store is
`data/negatives_store.py`, which imports no model code; this module is generation only.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import tqdm
from PIL import Image

from nsync_jax import errors, hosts, models, runs, sampling, trees
from nsync_jax.data import sources
from nsync_jax.data.examples import BadImageError, ExampleSet
from nsync_jax.data.negatives_store import IMAGES, SETTINGS, image_name, read_manifest

__all__ = ["IMAGES", "SETTINGS", "image_name", "read_manifest"]  # The reader's, re-exported.

FORMAT_VERSION = 1


def image_seed(example_id: str, k: int) -> int:
    """A stable 32-bit seed for image k of example `example_id` (same across runs/hosts)."""
    digest = hashlib.sha256(f"{example_id}\x00{k}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


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


def check_settings(path: str, settings: dict[str, Any]) -> None:
    """Raises ValueError naming every setting in which the store at `path` differs."""
    with open(os.path.join(path, SETTINGS)) as f:
        stored = trees.flatten_names(json.load(f))
    wanted = trees.flatten_names(json.loads(json.dumps(settings)))
    differing = [
        f"{key}: store has {stored.get(key)!r}, config has {wanted.get(key)!r}"
        for key in sorted(set(stored) | set(wanted))
        if stored.get(key) != wanted.get(key)
    ]
    if differing:
        raise errors.ConfigError(
            f"negatives store {path} was made with other settings; use another "
            "negatives.path or the store's settings. Differences:\n  " + "\n  ".join(differing)
        )


def _write_atomic(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _manifest_name(process_index: int) -> str:
    return "manifest.jsonl" if process_index == 0 else f"manifest-{process_index}.jsonl"


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What one `generate_store` call did."""

    path: str
    generated: int  # Images made by this call (this process).
    total: int  # Images the store should hold (positives × K).
    complete: bool  # Whether every (id, k) is now in the manifest (made, or bad positive).
    bad_positives: int = 0  # Positives found undecodable by this call (skipped).


def _validate(config: ml_collections.ConfigDict) -> None:
    neg = config.negatives
    if not neg.path:
        raise errors.ConfigError("negatives.path is empty: set the store folder to write")
    if "{caption}" not in neg.prompt_template:
        raise errors.ConfigError(
            f"negatives.prompt_template {neg.prompt_template!r} has no {{caption}}"
        )
    if neg.per_example < 1:
        raise errors.ConfigError(f"negatives.per_example must be >= 1, got {neg.per_example}")
    if neg.size < 0:
        raise errors.ConfigError(f"negatives.size must be >= 0, got {neg.size}")
    sampling.SamplerSettings.from_config(neg)  # Scheduler, steps and guidance checks.


def _decodable(
    positives: ExampleSet,
    pending: list[tuple[str, int]],
    on_bad_image: str,
    max_images: int | None,
) -> tuple[list[tuple[str, int]], dict[str, str]]:
    """(the pending (id, k) whose positive decodes, up to `max_images`; {bad id: reason}).

    Every process decodes the same positives, so all agree on the work to share.
    """
    row = {example_id: i for i, example_id in enumerate(positives.ids)}
    good: list[tuple[str, int]] = []
    bad: dict[str, str] = {}
    checked: set[str] = set()
    for example_id, k in pending:
        if max_images is not None and len(good) >= max_images:
            break
        if example_id not in checked:
            checked.add(example_id)
            try:
                positives.image(row[example_id])
            except BadImageError as e:
                if on_bad_image != "skip":
                    raise e.refused() from e
                bad[example_id] = str(e)
        if example_id not in bad:
            good.append((example_id, k))
    if bad:
        logging.warning(
            "negatives: %d positives cannot be decoded (e.g. %s); no negatives are made for "
            "them (data.on_bad_image='skip'); training skips them",
            len(bad),
            next(iter(bad.values())),
        )
    return good, bad


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

    Raises:
      errors.ConfigError: bad negatives settings, or a store made with other settings or
        other captions.
      BadImageError: a positive cannot be decoded and `data.on_bad_image="error"`.
    """
    hosts.check_same_config(config)
    _validate(config)
    neg = config.negatives
    path = neg.path
    settings = store_settings(config)
    process, processes = jax.process_index(), jax.process_count()
    hosts.check_shared_dir(path, "negatives.path")
    if os.path.exists(os.path.join(path, SETTINGS)):
        check_settings(path, settings)
    os.makedirs(os.path.join(path, IMAGES), exist_ok=True)
    if process == 0:
        # Temporaries of an interrupted run. Safe: no process can finish a batch (and
        # write) before every process, this one included, has joined the first.
        for stale in glob.glob(os.path.join(path, IMAGES, "*.tmp-*")):
            os.remove(stale)
    data_config = ml_collections.ConfigDict(config.data.to_dict())
    data_config.cache_images = False  # Each positive is decoded once, to check it.
    positives = sources.load_positives(data_config, config.model.resolution)
    done = read_manifest(path, repair=True)
    captions = dict(zip(positives.ids, positives.captions, strict=True))
    prompts = {i: neg.prompt_template.format(caption=c) for i, c in captions.items()}
    for (example_id, k), entry in done.items():
        if example_id in prompts and entry["prompt"] != prompts[example_id]:
            raise errors.ConfigError(
                f"negatives store {path} holds image {example_id!r} k={k} for prompt "
                f"{entry['prompt']!r}, but the data now gives {prompts[example_id]!r}; "
                "the captions changed: use a new negatives.path"
            )
    total = len(positives) * neg.per_example
    # Recorded bad positives are tried again: they may have been fixed since.
    pending = [
        (example_id, k)
        for example_id in positives.ids
        for k in range(neg.per_example)
        if "file" not in done.get((example_id, k), {})
    ]
    todo, bad = _decodable(positives, pending, config.data.on_bad_image, max_images)
    new_bad = [(i, k) for i, k in pending if i in bad and (i, k) not in done]

    def start_writing() -> None:
        """Claims the store for these settings and records the bad positives (process 0)."""
        if process != 0:
            return
        if not os.path.exists(os.path.join(path, SETTINGS)):

            def write(tmp):
                with open(tmp, "w") as f:
                    json.dump(settings, f, indent=2)

            _write_atomic(os.path.join(path, SETTINGS), write)
        if new_bad:
            with open(os.path.join(path, _manifest_name(process)), "a") as f:
                for example_id, k in new_bad:
                    entry = {
                        "id": example_id,
                        "k": k,
                        "caption": captions[example_id],
                        "prompt": prompts[example_id],
                        "bad": bad[example_id],
                    }
                    f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def result(generated: int) -> GenerationResult:
        done = read_manifest(path)
        complete = all((i, k) in done for i in positives.ids for k in range(neg.per_example))
        return GenerationResult(path, generated, total, complete, len(bad))

    if not todo:
        if new_bad:
            start_writing()
        return result(0)

    # Contiguous equal shares; every process runs the same number of batches.
    share = -(-len(todo) // processes)
    mine = todo[process * share : (process + 1) * share]
    logging.info(
        "negatives: %d of %d images to generate into %s (%d here)",
        len(todo),
        total,
        path,
        len(mine),
    )
    model, params = model_and_params or runs.build_base(config)
    sampler = sampling.make_sampler(config, neg, model, params, devices)
    logging.info("%s", hosts.describe(sampler.mesh))
    start_writing()  # The model is built: these settings will make images.
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
    hosts.sync("negatives written")  # Every process's images and lines are in place.
    return result(generated)
