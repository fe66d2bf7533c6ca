"""Sets of (id, image, caption) examples: in memory (`Examples`) or read on demand
(`LazyExamples`), and the shared preprocessing.

Both kinds answer the same questions: `ids`, `captions`, `len()`, `image(i)` (uint8 HWC at
training resolution, or `image(i, size=(h, w))` resized and cropped to an aspect-ratio
bucket), `size(i)` (the stored image's (height, width), read from the file's header
without decoding it where the source can), `name(i)` (what to print when image i is bad),
`select(ids)` and `fingerprint()`. The batch iterator (`pipeline.PairedBatches`) only ever
asks for the rows a host needs, so a lazy set decodes only those images.

`fingerprint()` identifies a set without decoding it, for checkpoints to refuse a resume on
other data: an in-memory set hashes its arrays (they are in memory already); a lazy set
hashes its ids and captions and asks its source what identifies the rows it holds (file
sizes and modification times, a TFDS dataset's version and record count), so 1072
paintings are never decoded just to be recognised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from nsync_jax import errors

# What PIL (and TFDS's PIL/OpenCV decoders) raise on truncated or unrecognised images:
# UnidentifiedImageError and truncation are OSErrors, some broken PNGs raise SyntaxError.
DECODE_ERRORS = (OSError, ValueError, SyntaxError)


class BadImageError(errors.UserError, ValueError):
    """An image that cannot be read or decoded; the message names the example and its file.

    A user error: where `data.on_bad_image="error"` stops on one, the launch scripts end
    with its one line, which `refused()` makes say how to skip such images instead.
    """

    def __init__(self, example_id: str, name: str, cause: BaseException | str, hint: str = ""):
        self.example_id = example_id
        self.name = name
        self.cause = cause
        super().__init__(f"cannot read image of example {example_id!r} ({name}): {cause}{hint}")

    def refused(self) -> BadImageError:
        """This error as `data.on_bad_image="error"` raises it: naming the skip setting."""
        hint = "; to leave out images that cannot be read, set data.on_bad_image=skip"
        return BadImageError(self.example_id, self.name, self.cause, hint)


class ExampleSet(Protocol):
    """What the batch iterator needs of a style set or a negatives set."""

    ids: tuple[str, ...]
    captions: tuple[str, ...]

    def __len__(self) -> int: ...

    def image(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 [R, R, 3] of example `index`, or [h, w, 3] for `size=(h, w)` (resized to
        cover it, centre-cropped); raises `BadImageError` naming it."""

    def size(self, index: int) -> tuple[int, int]:
        """(height, width) of example `index` as stored, for bucketing; decodes no pixels
        where the source can avoid it."""

    def name(self, index: int) -> str:
        """Where example `index` comes from (a file, a TFDS record), for messages."""

    def select(self, ids: Sequence[str]) -> ExampleSet:
        """The examples with `ids`, in that order; a missing id is a KeyError naming it."""

    def fingerprint(self) -> dict[str, Any]:
        """JSON values that identify these examples and their images, without decoding."""


def sha256_json(value: Any) -> str:
    """SHA-256 of `value` as canonical JSON (for fingerprints)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _check_ids_and_captions(ids: tuple[str, ...], captions: tuple[str, ...]) -> None:
    if len(captions) != len(ids):
        raise ValueError(f"{len(ids)} ids and {len(captions)} captions differ")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        duplicate = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"example id {duplicate!r} is not unique")
    for example_id, caption in zip(ids, captions, strict=True):
        if not caption or not caption.strip():
            raise ValueError(f"example {example_id!r} has an empty caption")


def _rows_of(all_ids: tuple[str, ...], ids: Sequence[str]) -> list[int]:
    index = {example_id: i for i, example_id in enumerate(all_ids)}
    missing = [i for i in ids if i not in index]
    if missing:
        raise KeyError(f"no example with id {missing[0]!r} ({len(missing)} missing)")
    return [index[i] for i in ids]


@dataclasses.dataclass(frozen=True)
class Examples:
    """Images (uint8 [N, H, W, 3], already at training resolution), ids and captions."""

    ids: tuple[str, ...]
    images: np.ndarray
    captions: tuple[str, ...]

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 [N, H, W, 3], got {self.images.dtype} {self.images.shape}"
            )
        if len(self.images) != len(self.ids):
            raise ValueError(f"{len(self.ids)} ids and {len(self.images)} images differ")
        _check_ids_and_captions(self.ids, self.captions)

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
        image = self.images[index]
        if size is None or tuple(size) == image.shape[:2]:
            return image
        return resize_and_crop(Image.fromarray(image), size)

    def size(self, index: int) -> tuple[int, int]:
        return self.images.shape[1], self.images.shape[2]

    def name(self, index: int) -> str:
        return f"in-memory example {self.ids[index]}"

    def select(self, ids: Sequence[str]) -> Examples:
        rows = _rows_of(self.ids, ids)
        return Examples(tuple(ids), self.images[rows], tuple(self.captions[r] for r in rows))

    def fingerprint(self) -> dict[str, Any]:
        pixels = hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).hexdigest()
        return {
            "kind": "in-memory",
            "num_examples": len(self),
            "ids_and_captions_sha256": sha256_json([self.ids, self.captions]),
            "images_shape": list(self.images.shape),
            "images_sha256": pixels,
        }


class LazyExamples:
    """Examples whose images are read, decoded and resized only when first asked for.

    Args:
      ids: one unique id per example.
      captions: one caption per example.
      names: what to call example i in messages (file path, TFDS split and index).
      read: index -> decoded image (PIL image or uint8 HWC array) at any size; may raise
        any of `DECODE_ERRORS` (reported as `BadImageError`).
      resolution: output side; images are resized and centre-cropped to it (unless
        `image` is asked for a bucket's size).
      cache: keep each decoded, resized image in memory after its first read
        (N·R²·3 bytes at most: 840 MB for 1072 images at 512 px), per size asked for.
      identify: `read`'s indices -> JSON values identifying those images without decoding
        them (file sizes and CRC32s, a dataset version); the source part of `fingerprint`.
      read_size: `read`'s index -> (height, width) of the stored image, without decoding
        its pixels (a file's header); None: `size` decodes the image to learn it.
      rows: which of `read`'s indices this set holds (a `select` view); all by default.
    """

    def __init__(
        self,
        ids: Sequence[str],
        captions: Sequence[str],
        names: Sequence[str],
        read: Callable[[int], Image.Image | np.ndarray],
        resolution: int,
        cache: bool,
        *,
        identify: Callable[[tuple[int, ...]], dict[str, Any]],
        read_size: Callable[[int], tuple[int, int]] | None = None,
        rows: Sequence[int] | None = None,
        _store: dict[tuple[int, tuple[int, int]], np.ndarray] | None = None,
    ):
        self.ids = tuple(ids)
        self.captions = tuple(captions)
        self.names = tuple(names)
        _check_ids_and_captions(self.ids, self.captions)
        if len(self.names) != len(self.ids):
            raise ValueError(f"{len(self.ids)} ids and {len(self.names)} names differ")
        self._read = read
        self._identify = identify
        self._read_size = read_size
        self.resolution = resolution
        self.cache = cache
        self._rows = tuple(range(len(self.ids))) if rows is None else tuple(rows)
        # Keyed by the underlying reader's index and the output size, so `select` views
        # share one cache.
        self._store = {} if _store is None else _store
        self.reads = 0  # Images decoded so far (tests check hosts decode only their rows).

    def __len__(self) -> int:
        return len(self.ids)

    def name(self, index: int) -> str:
        return self.names[index]

    def _decoded(self, index: int) -> Image.Image:
        decoded = self._read(self._rows[index])
        if isinstance(decoded, np.ndarray):
            decoded = Image.fromarray(_as_rgb_uint8(decoded))
        return decoded

    def image(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
        size = (self.resolution, self.resolution) if size is None else tuple(size)
        key = (self._rows[index], size)
        cached = self._store.get(key)
        if cached is not None:
            return cached
        try:
            pixels = resize_and_crop(self._decoded(index), size)
        except DECODE_ERRORS as e:
            raise BadImageError(self.ids[index], self.names[index], e) from e
        self.reads += 1
        if self.cache:
            self._store[key] = pixels
        return pixels

    def size(self, index: int) -> tuple[int, int]:
        """(height, width) as stored: from `read_size` (a header) if the source has one,
        else by decoding the image (counted in `reads`)."""
        try:
            if self._read_size is not None:
                return self._read_size(self._rows[index])
            self.reads += 1
            decoded = self._decoded(index)
            return decoded.height, decoded.width
        except DECODE_ERRORS as e:
            raise BadImageError(self.ids[index], self.names[index], e) from e

    def select(self, ids: Sequence[str]) -> LazyExamples:
        picked = _rows_of(self.ids, ids)
        return LazyExamples(
            ids=[self.ids[r] for r in picked],
            captions=[self.captions[r] for r in picked],
            names=[self.names[r] for r in picked],
            read=self._read,
            resolution=self.resolution,
            cache=self.cache,
            identify=self._identify,
            read_size=self._read_size,
            rows=[self._rows[r] for r in picked],
            _store=self._store,
        )

    def fingerprint(self) -> dict[str, Any]:
        """Ids, captions and the source's identity of the rows held; decodes nothing."""
        return {
            "kind": "lazy",
            "num_examples": len(self),
            "ids_and_captions_sha256": sha256_json([self.ids, self.captions]),
            "source": self._identify(self._rows),
        }


def file_stats(names: Sequence[str], paths: Sequence[str]) -> dict[str, Any]:
    """What identifies files without decoding them: names, sizes and CRC32s of their bytes.

    Reading the bytes costs far less than decoding them (a style set of 1000 paintings is
    a few hundred MB at most) and, unlike modification times, survives copying the data
    to another machine, so a resume there is not refused. A rewritten, added or removed
    file changes it.

    Raises:
      errors.NotFound: a file does not exist (any more).
    """
    stats = []
    for name, path in zip(names, paths, strict=True):
        crc = 0
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    crc = zlib.crc32(chunk, crc)
        except FileNotFoundError as e:
            raise errors.NotFound(f"image file {path} does not exist (any more)") from e
        stats.append([name, os.path.getsize(path), crc])
    return {
        "num_files": len(stats),
        "bytes": sum(size for _, size, _ in stats),
        "names_sizes_crc32_sha256": sha256_json(stats),
    }


class ImageSequence(Sequence[np.ndarray]):
    """The images of an `ExampleSet` as a read-only sequence that decodes on access.

    For code that takes a list of images (e.g. `evaluation.compare`) but must not hold a
    lazy set's every decoded image at once.
    """

    def __init__(self, examples: ExampleSet):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.examples.image(i) for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"image {index} of {len(self)}")
        return self.examples.image(index % len(self))


def _as_rgb_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected an HWC image with 1, 3 or 4 channels, got {array.shape}")
    return np.ascontiguousarray(array[..., :3])


def header_size(path: str) -> tuple[int, int]:
    """(height, width) of the image file at `path` from its header; no pixel is decoded
    (PIL's `open` is lazy: it reads the header, `load` would decode)."""
    with Image.open(path) as image:
        return image.height, image.width


def resize_and_crop(image: Image.Image, size: int | tuple[int, int]) -> np.ndarray:
    """Bicubic resize to cover `size` (a side, or (height, width)), then a centre crop;
    uint8 HWC. For a square `size` the shorter side is resized to it."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    image = image.convert("RGB")
    width, height = image.size
    scale = max(out_h / height, out_w / width)
    resized = (max(out_w, round(width * scale)), max(out_h, round(height * scale)))
    image = image.resize(resized, Image.Resampling.BICUBIC)
    left = (resized[0] - out_w) // 2
    top = (resized[1] - out_h) // 2
    image = image.crop((left, top, left + out_w, top + out_h))
    return np.asarray(image, dtype=np.uint8)


def to_pixels(images: np.ndarray, flip: np.ndarray | None = None) -> np.ndarray:
    """uint8 NHWC → float32 NCHW in [-1, 1] (the models' input), flipping rows where
    `flip` is set: the one pixel normalisation, for batches and the latent cache alike."""
    if flip is not None:
        images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    pixels = images.astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
