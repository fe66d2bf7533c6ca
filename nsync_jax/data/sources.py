"""Where positives and negatives come from, chosen by `config.data.source` and
`config.negatives.source`; several styles in one run by `config.data.styles` (`styles.py`)."""

from __future__ import annotations

import ml_collections

from nsync_jax.data import demo, folder, negatives_store, styles, tfds_source
from nsync_jax.data.examples import ExampleSet

DATA_SOURCES = ("demo", "tfds", "folder", "digits")
NEGATIVE_SOURCES = ("demo", "store")


def load_positives(data_config: ml_collections.ConfigDict, resolution: int) -> ExampleSet:
    """The style set named by `data_config.source` (every style's, concatenated, when
    `data_config.styles` is set); real sources decode images lazily."""
    return load_styled(data_config, resolution)[0]


def load_styled(
    data_config: ml_collections.ConfigDict, resolution: int
) -> tuple[ExampleSet, styles.StyleIndex | None]:
    """The style set and, with `data_config.styles`, each example's style word and label
    (None for a one-style run)."""
    if not data_config.styles:
        return _load_source(data_config, resolution), None
    return styles.load(data_config, lambda style_config: _load_source(style_config, resolution))


def _load_source(data_config: ml_collections.ConfigDict, resolution: int) -> ExampleSet:
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
