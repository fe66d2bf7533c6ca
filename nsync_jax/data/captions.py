"""Captions of style examples: from the source's metadata, a captions file, or a template.

Resolution order per example: the captions file (`data.captions_file`) if one is given,
else the source's own caption (e.g. `metadata.jsonl`'s "text"). Where neither exists:
- no example has a caption at all (e.g. CycleGAN's TFDS sets carry none): every example
  gets `data.caption_template`, and the log says so once, with the count and the source;
- only some examples lack one: an error naming the first, unless `data.caption_fallback`
  lets them take the template (the log again says how many and which).

A captions file is JSON (`{"<id>": "<caption>", ...}`) or JSONL, one object per line:
either `{"<id>": "<caption>"}` or the metadata form `{"file_name": "<id>", "text": "..."}`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence

import ml_collections

from nsync_jax import errors


def read_jsonl_objects(path: str, lines: Iterable[str]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; errors name the file and line."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e})") from e
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected an object, got {record!r}")
        yield number, record


def read_captions_file(path: str) -> dict[str, str]:
    """`{example id: caption}` from a JSON or JSONL file; errors name the file and line."""
    if not os.path.isfile(path):
        raise errors.NotFound(f"data.captions_file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        captions: dict[str, str] = {}
        for number, record in read_jsonl_objects(path, text.splitlines()):
            if "file_name" in record:
                pairs = [(record["file_name"], record.get("text"))]
            else:
                pairs = list(record.items())
            for key, caption in pairs:
                captions[str(key)] = _check_caption(caption, f"{path}:{number}")
        return captions
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e}); use .jsonl for one object per line") from e
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected an object {{id: caption}}, got {type(record).__name__}")
    return {str(k): _check_caption(v, f"{path} key {k!r}") for k, v in record.items()}


def _check_caption(caption: object, where: str) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{where}: caption must be a non-empty string, got {caption!r}")
    return caption.strip()


def resolve_captions(
    ids: Sequence[str],
    source_captions: Sequence[str | None],
    data_config: ml_collections.ConfigDict,
    source_name: str,
) -> tuple[str, ...]:
    """One caption per id, following the order in this module's docstring.

    Args:
      ids: example ids, in order.
      source_captions: the source's own caption per id, None where it has none.
      data_config: `config.data` (`captions_file`, `caption_template`, `caption_fallback`).
      source_name: how the log and errors name the source.
    """
    from_file: dict[str, str] | None = None
    if data_config.captions_file:
        from_file = read_captions_file(data_config.captions_file)
        found = [from_file.get(i) for i in ids]
        origin = f"captions file {data_config.captions_file}"
        unknown = set(from_file) - set(ids)
        if unknown:
            logging.warning(
                "%s has %d captions for ids not in %s (e.g. %r); they are unused",
                origin,
                len(unknown),
                source_name,
                sorted(unknown)[0],
            )
    else:
        found = [c.strip() if c and c.strip() else None for c in source_captions]
        origin = f"{source_name} metadata"
    missing = [i for i, c in zip(ids, found, strict=True) if c is None]
    template = data_config.caption_template
    if not missing:
        logging.info("captions: %d from %s", len(ids), origin)
        return tuple(found)
    if not template.strip():
        raise errors.ConfigError("data.caption_template is empty but some examples need it")
    if len(missing) == len(ids) and from_file is None:
        logging.warning(
            "captions: %s has none for its %d examples; every example uses the template "
            "data.caption_template=%r (set data.captions_file to use real captions)",
            source_name,
            len(ids),
            template,
        )
    elif not data_config.caption_fallback:
        raise errors.ConfigError(
            f"example {missing[0]!r} has no caption in {origin} ({len(missing)} of "
            f"{len(ids)} missing); add them, or set data.caption_fallback=True to use "
            f"data.caption_template={template!r} for those"
        )
    else:
        logging.warning(
            "captions: %d of %d examples have none in %s (e.g. %r); they use the template "
            "data.caption_template=%r",
            len(missing),
            len(ids),
            origin,
            missing[0],
            template,
        )
    return tuple(template if c is None else c for c in found)
