"""`Examples`: an in-memory set of images with ids and captions, and its preprocessing."""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class Examples:
    """Images (uint8 [N, H, W, 3], already at training resolution), ids and captions."""

    ids: tuple[str, ...]
    images: np.ndarray
    captions: tuple[str, ...]

    def __post_init__(self):
        n = len(self.ids)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 [N, H, W, 3], got {self.images.dtype} {self.images.shape}"
            )
        if len(self.images) != n or len(self.captions) != n:
            raise ValueError(
                f"{n} ids, {len(self.images)} images and {len(self.captions)} captions differ"
            )
        if len(set(self.ids)) != n:
            raise ValueError("example ids are not unique")
        for example_id, caption in zip(self.ids, self.captions, strict=True):
            if not caption or not caption.strip():
                raise ValueError(f"example {example_id!r} has an empty caption")

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, ids: list[str] | tuple[str, ...]) -> Examples:
        """The examples with `ids`, in that order; a missing id is an error naming it."""
        index = {example_id: i for i, example_id in enumerate(self.ids)}
        missing = [i for i in ids if i not in index]
        if missing:
            raise KeyError(f"no example with id {missing[0]!r} ({len(missing)} missing)")
        rows = [index[i] for i in ids]
        return Examples(tuple(ids), self.images[rows], tuple(self.captions[r] for r in rows))


def resize_and_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """Bicubic resize of the shorter side to `resolution`, then a centre crop; uint8 HWC."""
    image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left = (size[0] - resolution) // 2
    top = (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image, dtype=np.uint8)
