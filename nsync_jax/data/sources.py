"""Where positives and negatives come from, chosen by `config.data.source` and
`config.negatives.source`."""

from __future__ import annotations

import ml_collections

from nsync_jax.data import demo, folder, negatives_store, tfds_source
from nsync_jax.data.examples import ExampleSet

DATA_SOURCES = ("demo", "tfds", "folder", "digits")
NEGATIVE_SOURCES = ("demo", "store")


def load_positives(data_config: ml_collections.ConfigDict, resolution: int) -> ExampleSet:
    """The style set named by `data_config.source`; real sources decode images lazily."""
    if data_config.source == "demo":
        return demo.demo_examples(data_config.demo_count, resolution, data_config.demo_seed, True)
    if data_config.source == "tfds":
        return tfds_source.tfds_examples(data_config, resolution)
    if data_config.source == "folder":
        return folder.folder_examples(data_config, resolution)
    if data_config.source == "digits":
        from nsync_jax.data import digits  # Lazy: needs scikit-learn (the bench extra).

        return digits.digits_examples(
            resolution,
            data_config.digits_rendering,
            tuple(data_config.digits_classes),
            data_config.digits_count,
            data_config.demo_seed,
        )
    raise ValueError(f"data.source={data_config.source!r} is not one of {DATA_SOURCES}")


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
        return negatives_store.load_store(
            negatives_config.path,
            resolution,
            k=negatives_config.pair_k,
            cache=data_config.cache_images,
            on_bad_image=data_config.on_bad_image,
        )
    raise ValueError(
        f"negatives.source={negatives_config.source!r} is not one of {NEGATIVE_SOURCES}"
    )
