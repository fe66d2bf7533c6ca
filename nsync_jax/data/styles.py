"""Several styles in one run (`data.styles`): one source per style, with its word and label.

`data.styles` is a tuple of dicts, one per style. Each holds `token` (what `{style}` of
the prompt template becomes for that style's examples: a new token per style under the
`textual_inversion` and `lora_ti` scopes, a word or tag otherwise), `label` (an int
>= 0; styles that share a label are positives of each other in the SupCon loss), and any
fields of the `data` group that pick and shape that style's source (`source`,
`tfds_name`, `split`, `path`, `captions_file`, `digits_rendering`, ...): those override
the `data` group for this style alone. Empty: the run has one style, `train.style_token`.

The styles' examples are concatenated in `data.styles` order into one set whose ids are
`style<k>-<id>` (k the style's position), so two styles may draw on the same source ids
(the same digits in two renderings) and negatives still pair by id. `StyleIndex` maps each
id to its token and label, so any `select` of the set (a validation split) keeps them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from nsync_jax import errors
from nsync_jax.data.examples import ExampleSet, sha256_json

STYLE_KEYS = ("token", "label")
# Fields of the `data` group that describe the whole run, not one style's source.
RUN_FIELDS = ("styles", "random_flip", "val_count", "caption_dropout", "on_bad_image",
              "cache_latents", "latent_batch_size")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Style:
    """One entry of `data.styles`: its prompt word, its label, its source's data config."""

    token: str
    label: int
    data_config: ml_collections.ConfigDict


def parse(data_config: ml_collections.ConfigDict) -> tuple[Style, ...]:
    """The styles of `data_config.styles`, checked (empty for a one-style run).

    Raises:
      errors.ConfigError: a style without `token` or `label`, a label that is not an int
        >= 0, a field the `data` group does not have or one that is the run's, or one
        token given two labels.
    """
    out = []
    labels_of: dict[str, int] = {}
    for k, entry in enumerate(data_config.styles):
        where = f"data.styles[{k}]"
        if not isinstance(entry, dict | ml_collections.ConfigDict):
            raise errors.ConfigError(f"{where} must be a dict, got {entry!r}")
        entry = dict(entry)
        missing = [key for key in STYLE_KEYS if key not in entry]
        if missing:
            raise errors.ConfigError(f"{where} has no {missing} (each style needs both)")
        token, label = entry.pop("token"), entry.pop("label")
        if not isinstance(token, str) or not token.strip():
            raise errors.ConfigError(f"{where}.token must be a non-empty string, got {token!r}")
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise errors.ConfigError(f"{where}.label must be an int >= 0, got {label!r}")
        if labels_of.setdefault(token, label) != label:
            raise errors.ConfigError(
                f"{where}: token {token!r} has label {label} here and {labels_of[token]} before"
            )
        unknown = [key for key in entry if key not in data_config or key in RUN_FIELDS]
        if unknown:
            raise errors.ConfigError(
                f"{where} sets {unknown}: a style may set only fields of its source in the "
                f"`data` group, not {RUN_FIELDS}"
            )
        style_config = ml_collections.ConfigDict(data_config.to_dict())
        style_config.styles = ()
        style_config.update(entry)
        out.append(Style(token, label, style_config))
    return tuple(out)


def run_tokens(data_config: ml_collections.ConfigDict, style_token: str) -> tuple[str, ...]:
    """The run's style words, each once, in `data.styles` order; `(style_token,)` for a
    one-style run (`train.style_token`)."""
    styles = parse(data_config)
    if not styles:
        return (style_token,)
    return tuple(dict.fromkeys(s.token for s in styles))


def with_split(data_config: ml_collections.ConfigDict, split: str) -> ml_collections.ConfigDict:
    """A copy of `data_config` reading data split `split`, in every style's entry too (a
    style's own `split` field would otherwise win)."""
    out = ml_collections.ConfigDict(data_config.to_dict())
    out.split = split
    if out.styles:
        out.styles = tuple({**dict(style), "split": split} for style in out.styles)
    return out


def example_tokens(
    ids: Sequence[str], index: StyleIndex | None, style_token: str
) -> tuple[str, ...]:
    """Each example's style word: its style's under `data.styles`, else `style_token`."""
    if index is None:
        return (style_token,) * len(ids)
    return index.of(ids)[0]


def prefixed(k: int, example_id: str) -> str:
    return f"style{k}-{example_id}"


class StyledExamples:
    """The examples of several sets in one (`ExampleSet`), ids prefixed by their set.

    Args:
      parts: one example set per style.
      rows: which (part, index in part) pairs this set holds, in order; all by default.
    """

    def __init__(self, parts: Sequence[ExampleSet], rows: Sequence[tuple[int, int]] | None = None):
        self.parts = tuple(parts)
        if rows is None:
            rows = [(k, i) for k, part in enumerate(self.parts) for i in range(len(part))]
        self.rows = tuple((int(k), int(i)) for k, i in rows)
        self.ids = tuple(prefixed(k, self.parts[k].ids[i]) for k, i in self.rows)
        self.captions = tuple(self.parts[k].captions[i] for k, i in self.rows)
        self._index = {example_id: n for n, example_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
        k, i = self.rows[index]
        return self.parts[k].image(i, size)

    def size(self, index: int) -> tuple[int, int]:
        k, i = self.rows[index]
        return self.parts[k].size(i)

    def name(self, index: int) -> str:
        k, i = self.rows[index]
        return f"style {k}: {self.parts[k].name(i)}"

    def select(self, ids: Sequence[str]) -> StyledExamples:
        missing = [i for i in ids if i not in self._index]
        if missing:
            raise KeyError(f"no example with id {missing[0]!r} ({len(missing)} missing)")
        return StyledExamples(self.parts, [self.rows[self._index[i]] for i in ids])

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "styles",
            "num_examples": len(self),
            "ids_and_captions_sha256": sha256_json([self.ids, self.captions]),
            "parts": [part.fingerprint() for part in self.parts],
        }


@dataclasses.dataclass(frozen=True)
class StyleIndex:
    """Each example id's style word and label."""

    tokens: dict[str, str]
    labels: dict[str, int]

    def of(self, ids: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
        """(the tokens, int32 labels) of `ids`, in order."""
        return tuple(self.tokens[i] for i in ids), np.asarray(
            [self.labels[i] for i in ids], np.int32
        )

    def fingerprint(self) -> str:
        return sha256_json(sorted((i, self.tokens[i], self.labels[i]) for i in self.tokens))


def load(
    data_config: ml_collections.ConfigDict,
    load_source: Callable[[ml_collections.ConfigDict], ExampleSet],
) -> tuple[StyledExamples, StyleIndex]:
    """Every style's examples (`load_source` of its data config) as one set, and its index.

    Raises:
      errors.ConfigError: `data.styles` is empty or malformed (`parse`), or a style's
        source has no examples.
    """
    styles = parse(data_config)
    if not styles:
        raise errors.ConfigError("data.styles is empty: this run has one style")
    parts = []
    for k, style in enumerate(styles):
        part = load_source(style.data_config)
        if len(part) == 0:
            raise errors.ConfigError(f"data.styles[{k}] ({style.token!r}) has no examples")
        parts.append(part)
    examples = StyledExamples(parts)
    tokens = {examples.ids[n]: styles[k].token for n, (k, _) in enumerate(examples.rows)}
    labels = {examples.ids[n]: styles[k].label for n, (k, _) in enumerate(examples.rows)}
    return examples, StyleIndex(tokens, labels)
