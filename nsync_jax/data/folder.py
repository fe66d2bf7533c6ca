"""Style examples from a local folder of images, with captions in `metadata.jsonl`.

The layout diffusers' training scripts and Hugging Face `imagefolder` datasets use:

    <path>/metadata.jsonl     {"file_name": "0001.jpg", "text": "a harbour at dawn"} per line
    <path>/0001.jpg ...

An example's id is its `file_name` (relative to `<path>`). A folder without
`metadata.jsonl` is an error (most likely forgotten) unless `data.captions_file` captions
its images or `data.caption_fallback=True` asks for `data.caption_template`: then every
image under `<path>` is an example, ids sorted, and a warning says how to caption them. Only
the listing happens at start; images are decoded when a host first needs them. An image's
size (for aspect-ratio buckets) is read from its file's header, without decoding it. The set's
fingerprint is the files' names, sizes and CRC32s of their bytes (`examples.file_stats`).
"""

from __future__ import annotations

import logging
import os

import ml_collections
from PIL import Image

from nsync_jax import errors
from nsync_jax.data import captions as captions_lib
from nsync_jax.data.examples import LazyExamples, file_stats, header_size

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA = "metadata.jsonl"


def _list_images(root: str) -> list[str]:
    found = []
    for directory, _, files in os.walk(root):
        for file in files:
            if file.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(directory, file), root))
    return sorted(found)


def read_metadata(path: str) -> list[tuple[str, str | None]]:
    """(file_name, text or None) per line of `path`; errors name the file and line."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, record in captions_lib.read_jsonl_objects(path, f):
            if not isinstance(record.get("file_name"), str):
                raise ValueError(f"{path}:{number}: expected {{'file_name': ..., 'text': ...}}")
            text = record.get("text")
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{path}:{number}: 'text' must be a string, got {text!r}")
            entries.append((record["file_name"], text))
    return entries


def _read_image(path: str) -> Image.Image:
    with Image.open(path) as image:
        image.load()  # Decode now, inside the caller's error handling, and close the file.
        return image


def folder_examples(data_config: ml_collections.ConfigDict, resolution: int) -> LazyExamples:
    """The examples under `data_config.path` (see the module docstring).

    A file listed in `metadata.jsonl` but absent is an error naming it, or with
    `data.on_bad_image="skip"` is left out, counted in the log.
    """
    root = data_config.path
    if not root or not os.path.isdir(root):
        raise errors.NotFound(f"data.path {root!r} is not a directory (data.source='folder')")
    metadata = os.path.join(root, METADATA)
    if os.path.isfile(metadata):
        entries = read_metadata(metadata)
        listed = {name for name, _ in entries}
        unlisted = [f for f in _list_images(root) if f not in listed]
        if unlisted:
            logging.warning(
                "%d images in %s are not in %s and are not used (e.g. %r)",
                len(unlisted),
                root,
                METADATA,
                unlisted[0],
            )
        absent = [name for name, _ in entries if not os.path.isfile(os.path.join(root, name))]
        if absent:
            if data_config.on_bad_image != "skip":
                raise errors.NotFound(
                    f"{metadata} lists {absent[0]!r} but {os.path.join(root, absent[0])} "
                    f"does not exist ({len(absent)} such files)"
                )
            logging.warning(
                "skipping %d files listed in %s that do not exist (e.g. %r)",
                len(absent),
                metadata,
                absent[0],
            )
            gone = set(absent)
            entries = [e for e in entries if e[0] not in gone]
    else:
        entries = [(name, None) for name in _list_images(root)]
        if entries and not (data_config.captions_file or data_config.caption_fallback):
            # Most likely forgotten: training on one template caption is rarely what was meant.
            raise errors.NotFound(
                f"data.path {root!r} has no {METADATA}: add one with a "
                '{"file_name": "0001.jpg", "text": "a harbour at dawn"} line per image, or '
                "set data.captions_file, or data.caption_fallback=True to caption every image "
                f"with data.caption_template={data_config.caption_template!r}"
            )
        logging.warning(
            "%s has no %s: using all %d images under it, uncaptioned; to caption them add "
            '%s with one {"file_name": ..., "text": ...} line per image (or set '
            "data.captions_file)",
            root,
            METADATA,
            len(entries),
            METADATA,
        )
    if not entries:
        raise errors.ConfigError(
            f"data.path {root!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    ids = [name for name, _ in entries]
    paths = [os.path.join(root, name) for name in ids]
    captions = captions_lib.resolve_captions(
        ids, [text for _, text in entries], data_config, f"folder {root}"
    )
    return LazyExamples(
        ids=ids,
        captions=captions,
        names=paths,
        read=lambda i: _read_image(paths[i]),
        resolution=resolution,
        cache=data_config.cache_images,
        identify=lambda rows: {
            "kind": "folder",
            **file_stats([ids[r] for r in rows], [paths[r] for r in rows]),
        },
        read_size=lambda i: header_size(paths[i]),
    )
