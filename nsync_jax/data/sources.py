"""Where positives and negatives come from, chosen by `config.data.source` and
`config.negatives.source`."""

from __future__ import annotations

import ml_collections

from nsync_jax.data import demo
from nsync_jax.data.examples import ExampleSet

DATA_SOURCES = ("demo", "tfds", "folder", "digits")
NEGATIVE_SOURCES = ("demo", "store")


def load_positives(data_config: ml_collections.ConfigDict, resolution: int) -> ExampleSet:
    """The style set named by `data_config.source`; real sources decode images lazily."""
    if data_config.source == "demo":
        return demo.demo_examples(data_config.demo_count, resolution, data_config.demo_seed, True)


DATA_SOURCES = ("demo", "tfds", "folder", "digits")


def load_negatives(
    negatives_config: ml_collections.ConfigDict,
    data_config: ml_collections.ConfigDict,
    resolution: int,
) -> ExampleSet:
    """The negatives named by `negatives_config.source`, paired with positives by id."""
    if negatives_config.source == "demo":
        if data_config.source != "demo":
            raise ValueError("negatives.source='demo' pairs only with data.source='demo'")
        return demo.demo_examples(data_config.demo_count, resolution, data_config.demo_seed, False)
    if negatives_config.source == "store":
        from nsync_jax import negatives  # Lazy: it imports this module.

        return negatives.load_store(negatives_config.path, resolution, k=negatives_config.pair_k)
    raise ValueError(
        f"negatives.source={negatives_config.source!r} is not one of {NEGATIVE_SOURCES}"
    )
