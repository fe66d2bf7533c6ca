"""Reading a negatives store: the images `nsync_jax.negatives` generated, as an example set.

A store is a folder (written by `nsync_jax/negatives.py`, which imports this module):

    <path>/settings.json      what decided the pixels (model, sampler, template, size, K)
    <path>/images/<id>_<k>.png
    <path>/manifest.jsonl     one line per finished (id, k): id, k, file, caption, prompt,
                              image seed; `manifest-<process>.jsonl` on other hosts

A line without `file` but with `bad` records a positive that could not be decoded when
the store was made (`data.on_bad_image="skip"`): no negative exists for it. Reading the
store gives such an id an image that raises `BadImageError`, so `PairedBatches` skips the
example exactly as it skips a bad positive (and with `on_bad_image="error"` names it). An
id with no line at all is still a `KeyError` at pairing: the store is unfinished.

This module imports no model or sampling code, so `data/sources.py` can read stores
without the generator's imports (which lead back to `data/sources.py`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from PIL import Image

from nsync_jax import errors
from nsync_jax.data.examples import LazyExamples, file_stats, sha256_json

SETTINGS = "settings.json"
IMAGES = "images"
MANIFESTS = "manifest*.jsonl"


def image_name(example_id: str, k: int) -> str:
    """File name of image (id, k); ids with characters unsafe in names get a hash suffix."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", example_id)
    if safe != example_id:
        safe += "-" + hashlib.sha256(example_id.encode()).hexdigest()[:8]
    return f"{safe}_{k}.png"


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
    """Finished images of the store at `path`: {(id, k): manifest entry}.

    An image beats a `bad` record of the same (id, k): the positive was fixed and its
    negative generated later, perhaps by another host into another manifest.
    """
    entries: dict[tuple[str, int], dict[str, Any]] = {}
    for name in sorted(glob.glob(os.path.join(path, MANIFESTS))):
        for entry in _read_manifest_file(name, repair):
            key = (entry["id"], entry["k"])
            if "file" in entry or key not in entries or "file" not in entries[key]:
                entries[key] = entry  # A repeat is the same image.
    return entries


def read_settings(path: str) -> dict[str, Any]:
    """The store's `settings.json`; `errors.NotFound` if there is no store at `path`."""
    settings = os.path.join(path, SETTINGS)
    if not os.path.exists(settings):
        raise errors.NotFound(
            f"no negatives store at {path!r} (no {SETTINGS}); make one with "
            "launch/generate_negatives.py"
        )
    with open(settings) as f:
        return json.load(f)


def _read_png(file: str, entry: dict[str, Any]) -> Image.Image:
    if "file" not in entry:
        # A ValueError, so `LazyExamples` reports it as the example's BadImageError.
        raise ValueError(
            "no negative: its positive could not be decoded when the store was made "
            f"({entry['bad']}); fix the image and rerun launch/generate_negatives.py"
        )
    with Image.open(file) as image:
        image.load()  # Decodes now, so a truncated file fails here, named.
        return image


def load_store(
    path: str,
    resolution: int,
    k: int = 0,
    ids: Sequence[str] | None = None,
    cache: bool = True,
    on_bad_image: str = "error",
) -> LazyExamples:
    """The store's images number `k` as a `LazyExamples` with the positives' ids.

    Image (id, k) becomes example `id`, so `PairedBatches` pairs it with positive `id`.
    Only the manifest is read here; PNGs are decoded when first asked for and resized and
    centre-cropped to `resolution` as positives are (with aspect-ratio buckets, to the
    bucket of the positive they pair with). The set's fingerprint is the manifest
    entries it uses, the settings' hash, and the PNGs' sizes and CRC32s.

    Args:
      path: the store folder.
      resolution: training resolution.
      k: which of the K images per example (`negatives.pair_k`).
      ids: the ids to load (e.g. the positives'); all of the store's by default.
      cache: keep decoded images in memory (`data.cache_images`).
      on_bad_image: `data.on_bad_image`; with "skip" a PNG listed but absent becomes a bad
        image (skipped in training) instead of an error here.

    Raises:
      errors.NotFound: no store at `path`, or a listed PNG is missing (on_bad_image="error").
      KeyError: an id in `ids` has no image k.
      errors.ConfigError: `k` is out of the store's range, or the store is empty.
      BadImageError (a ValueError), at read time: a PNG cannot be decoded, or the id's
        positive was bad when the store was made.
    """
    settings = read_settings(path)
    per_example = settings["per_example"]
    if not 0 <= k < per_example:
        raise errors.ConfigError(
            f"negatives.pair_k={k} but the store at {path} has {per_example} per id"
        )
    entries = {i: e for (i, kk), e in read_manifest(path).items() if kk == k}
    if ids is None:
        ids = sorted(entries)
    if not ids:
        raise errors.ConfigError(f"negatives store {path} holds no images")
    missing = [i for i in ids if i not in entries]
    if missing:
        raise KeyError(
            f"negatives store {path} has no image k={k} for example {missing[0]!r} "
            f"({len(missing)} missing); finish it with launch/generate_negatives.py"
        )
    used = [entries[i] for i in ids]
    files = [os.path.join(path, e["file"]) if "file" in e else path for e in used]
    absent = [f for f, e in zip(files, used, strict=True) if "file" in e and not os.path.isfile(f)]
    if absent:
        if on_bad_image != "skip":
            raise errors.NotFound(
                f"negative image {absent[0]} is missing ({len(absent)} listed in the "
                f"manifest of {path} are); rerun launch/generate_negatives.py"
            )
        logging.warning(
            "negatives store %s: %d listed images are missing (e.g. %s); their examples are "
            "skipped (data.on_bad_image='skip')",
            path,
            len(absent),
            absent[0],
        )
    settings_sha256 = sha256_json(settings)
    gone = set(absent)
    present = {j for j, e in enumerate(used) if "file" in e and files[j] not in gone}

    def identify(rows: tuple[int, ...]) -> dict[str, Any]:
        picked = [used[r] for r in rows]
        stats = [(used[r]["file"], files[r]) for r in rows if r in present]
        return {
            "kind": "negatives_store",
            "settings_sha256": settings_sha256,
            "entries_sha256": sha256_json(
                [[e["id"], e["k"], e.get("file"), e.get("image_seed")] for e in picked]
            ),
            **file_stats([name for name, _ in stats], [file for _, file in stats]),
        }

    return LazyExamples(
        ids=ids,
        captions=[e["caption"] for e in used],
        names=[
            files[j] if "file" in e else f"{path} manifest, bad positive {e['id']!r} k={k}"
            for j, e in enumerate(used)
        ],
        read=lambda j: _read_png(files[j], used[j]),
        resolution=resolution,
        cache=cache,
        identify=identify,
    )
