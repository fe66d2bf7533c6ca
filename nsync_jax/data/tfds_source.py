"""Style examples from a prepared TFDS dataset, read with `tfds.data_source` (no TensorFlow).

`tfds.data_source` gives random access to the array_record files, so a host decodes only
the records its batches need. CycleGAN's sets (`cycle_gan/monet2photo`, `vangogh2photo`,
`ukiyoe2photo`) hold `image` and `label`; the style side is split `trainA` (`testA` for
evaluation). They carry no file names, so ids are `<split>-<index>` (`trainA-00042`); a
dataset with a file-name feature (`file_name`, `filename`, `image/filename`) uses it, and
one with a `caption` or `text` feature supplies captions. Those text features are read
once at start with image decoding skipped. An image's size (for aspect-ratio buckets) is
the image feature's shape where the dataset fixes it; otherwise (CycleGAN: (None, None, 3))
the record is read with decoding skipped and the size taken from the encoded image's
header, so no pixel is decoded either way. The set's fingerprint is the dataset's name,
config, version, split and record count (from `dataset_info`), and the rows it holds.

Preparing the data needs TensorFlow and network once, on any machine, e.g.
    tfds build cycle_gan/monet2photo --file_format=array_record --data_dir=$DIR
(or `data.tfds_download=True` where that works); training then reads `$DIR` only.
"""

from __future__ import annotations

import io

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from nsync_jax import errors
from nsync_jax.data import captions as captions_lib
from nsync_jax.data.examples import LazyExamples, sha256_json

FILE_NAME_KEYS = ("file_name", "filename", "image/filename")
CAPTION_KEYS = ("caption", "text")


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value.item())
    return str(value)


def _open(data_config: ml_collections.ConfigDict, decoders=None):
    kwargs = dict(
        split=data_config.split,
        data_dir=data_config.tfds_data_dir or None,
        download=data_config.tfds_download,
        decoders=decoders,
    )
    if data_config.tfds_download:
        kwargs["download_and_prepare_kwargs"] = {"file_format": "array_record"}
    try:
        return tfds.data_source(data_config.tfds_name, **kwargs)
    except (NotImplementedError, FileNotFoundError, AssertionError, KeyError) as e:
        # TFDS reports a dataset that was never prepared as an unsupported file format
        # or as a KeyError on its (empty) splits.
        builder = tfds.builder(data_config.tfds_name, data_dir=data_config.tfds_data_dir or None)
        if builder.is_prepared():
            raise
        raise errors.NotFound(
            f"TFDS dataset {data_config.tfds_name!r} is not prepared under "
            f"{builder.data_dir}; prepare it once with `tfds build {data_config.tfds_name} "
            "--file_format=array_record --data_dir=<dir>` and set data.tfds_data_dir"
        ) from e


def _identify(info, split: str, count: int, rows: tuple[int, ...]) -> dict:
    """A split's identity from its `dataset_info`, and the rows a set holds."""
    return {
        "kind": "tfds",
        "name": info.name,
        "config": info.config_name or None,
        "version": str(info.version),
        "split": split,
        "num_records": count,
        "rows_sha256": sha256_json(list(rows)),
    }


def _size_reader(data_config: ml_collections.ConfigDict, feature, image_key: str):
    """index -> (height, width) of the stored image, without decoding its pixels."""
    height, width = feature.shape[:2]
    if height is not None and width is not None:
        return lambda i: (int(height), int(width))
    encoded = []  # Opened on first use: only runs with buckets read sizes.

    def read_size(i: int) -> tuple[int, int]:
        if not encoded:
            encoded.append(_open(data_config, decoders={image_key: tfds.decode.SkipDecoding()}))
        with Image.open(io.BytesIO(encoded[0][i][image_key])) as image:
            return image.height, image.width

    return read_size


def tfds_examples(data_config: ml_collections.ConfigDict, resolution: int) -> LazyExamples:
    """Split `data_config.split` of TFDS dataset `data_config.tfds_name`, read lazily."""
    source = _open(data_config)
    features = source.dataset_info.features
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    if not images:
        raise errors.ConfigError(f"TFDS dataset {data_config.tfds_name!r} has no image feature")
    image_key = images[0]
    id_key = next((k for k in FILE_NAME_KEYS if k in features), None)
    caption_key = next((k for k in CAPTION_KEYS if k in features), None)
    split = data_config.split
    count = len(source)
    if count == 0:
        raise errors.ConfigError(f"TFDS {data_config.tfds_name!r} split {split!r} is empty")
    ids = [f"{split}-{i:05d}" for i in range(count)]
    source_captions: list[str | None] = [None] * count
    if id_key or caption_key:
        text_only = _open(data_config, decoders={image_key: tfds.decode.SkipDecoding()})
        for i in range(count):
            record = text_only[i]
            if id_key:
                ids[i] = _text(record[id_key])
            if caption_key:
                source_captions[i] = _text(record[caption_key])
    where = f"TFDS {data_config.tfds_name} {split}"
    captions = captions_lib.resolve_captions(ids, source_captions, data_config, where)
    return LazyExamples(
        ids=ids,
        captions=captions,
        names=[f"{where}[{i}] ({ids[i]})" for i in range(count)],
        read=lambda i: source[i][image_key],
        resolution=resolution,
        cache=data_config.cache_images,
        identify=lambda rows: _identify(source.dataset_info, split, count, rows),
        read_size=_size_reader(data_config, features[image_key], image_key),
    )
