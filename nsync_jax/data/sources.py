"""Where positives and negatives come from, chosen by `config.data.source` and
`config.negatives.source`."""

from __future__ import annotations

import ml_collections

from nsync_jax.data import demo
from nsync_jax.data.examples import Examples

DATA_SOURCES = ("demo", "digits")
NEGATIVE_SOURCES = ("demo", "store")


def load_positives(data_config: ml_collections.ConfigDict, resolution: int) -> Examples:
    if data_config.source == "demo":
        return demo.demo_examples(data_config.demo_count, resolution, data_config.demo_seed, True)
    if data_config.source == "digits":
        from nsync_jax.data import digits  # Lazy: needs scikit-learn (the bench extra).

        return digits.digits_examples(
            resolution,
            data_config.digits_rendering,
            tuple(data_config.digits_classes),
            data_config.digits_count,
            data_config.demo_seed,
        )
    raise NotImplementedError(
        f"data.source={data_config.source!r} is not available yet; sources: {DATA_SOURCES} "
        "(TFDS and image folders come with the real-data issue)"
    )


def load_negatives(
    negatives_config: ml_collections.ConfigDict,
    data_config: ml_collections.ConfigDict,
    resolution: int,
) -> Examples:
    if negatives_config.source == "demo":
        if data_config.source != "demo":
            raise ValueError("negatives.source='demo' pairs only with data.source='demo'")
        return demo.demo_examples(data_config.demo_count, resolution, data_config.demo_seed, False)
    if negatives_config.source == "store":
        from nsync_jax import negatives  # Lazy: it imports this module.

        return negatives.load_store(negatives_config.path, resolution, k=negatives_config.pair_k)
    raise NotImplementedError(
        f"negatives.source={negatives_config.source!r} is not available yet; sources: "
        f"{NEGATIVE_SOURCES} (the pregenerated negatives store comes with the real-data issue)"
    )
