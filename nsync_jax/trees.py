"""Comparing two flat trees by name: the one "missing / unexpected / misshapen" check.

Loading weights, exporting them and resuming a checkpoint all compare what a tree should
hold with what a file or a run holds; each says it in its own words, from one `TreeDiff`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class TreeDiff:
    """Names by kind of difference, each list in the order its mapping holds them.

    missing: in `expected` only. unexpected: in `actual` only. misshapen: in both, with
    values that differ (shapes, or whatever the caller compares).
    """

    missing: list[Hashable]
    unexpected: list[Hashable]
    misshapen: list[Hashable]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshapen)


def diff(
    expected: Mapping[Hashable, Any],
    actual: Mapping[Hashable, Any],
    same: Callable[[Any, Any], bool] = lambda a, b: a == b,
) -> TreeDiff:
    """How `actual` differs from `expected`, both flat mappings of name -> shape (-ish).

    `same(expected_value, actual_value)` decides whether a name held by both matches.
    """
    return TreeDiff(
        missing=[k for k in expected if k not in actual],
        unexpected=[k for k in actual if k not in expected],
        misshapen=[k for k in expected if k in actual and not same(expected[k], actual[k])],
    )


def flatten_names(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts (JSON objects) as {"group.field": value}, for naming differing fields."""
    return traverse_util.flatten_dict(tree, sep=".")
