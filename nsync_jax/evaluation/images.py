"""Image sets for evaluation: listing folders, loading, and the embedders' crops and resizes.

Every function here works on one PIL image so image sets of mixed sizes are fine; the
embedders batch the fixed-size results. Resizes go through PIL, as the reference
pipelines do (torchvision's `Resize` on a PIL image and CMMD's `im.resize` both call PIL,
whose bicubic and bilinear filters antialias when downsampling).
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST = "prompts.jsonl"  # What sampling.sample_to_dir writes beside its images.

# OpenAI CLIP's normalisation (CSD and CMMD both use it).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

ImageLike = str | Image.Image | np.ndarray


def list_images(folder: str) -> list[str]:
    """The images of `folder`: those its `prompts.jsonl` lists, else every image file.

    `sampling.sample_to_dir` writes `prompts.jsonl` (one record with a `file` per
    generated image) beside a `grid.png` that must not count as a sample; other folders
    (a test split) list their image files sorted by name. An empty set is an error.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist")
    manifest = os.path.join(folder, MANIFEST)
    if os.path.exists(manifest):
        with open(manifest) as f:
            names = [json.loads(line)["file"] for line in f if line.strip()]
        missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
        if missing:
            raise FileNotFoundError(f"{manifest} lists {missing[0]!r}, which does not exist")
    else:
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise ValueError(f"image folder {folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [os.path.join(folder, name) for name in names]


def load_rgb(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or a uint8 HWC array."""
    if isinstance(image, str):
        with Image.open(image) as im:
            im.load()
            return im.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"array images must be uint8 HWC, got {image.dtype} {image.shape}")
        return Image.fromarray(image).convert("RGB")
    return image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int, resample: int) -> Image.Image:
    """torchvision `Resize(size)`: shorter side to `size`, longer side truncated to int."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), resample=resample)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision `CenterCrop(size)` (offsets rounded half to even, as `round`)."""
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"center_crop({size}) of a smaller image {image.size}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def clip_normalize(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] HWC pixels to CLIP's normalised input."""
    return (pixels - CLIP_MEAN) / CLIP_STD


def csd_preprocess(image: Image.Image, size: int = 224) -> np.ndarray:
    """CSD's transform: shorter side to `size` (bicubic), centre crop, CLIP mean/std."""
    image = resize_shorter_side(image.convert("RGB"), size, Image.BICUBIC)
    pixels = np.asarray(center_crop(image, size), np.float32) / 255.0
    return clip_normalize(pixels)


def cmmd_preprocess(image: Image.Image, size: int = 336) -> np.ndarray:
    """CMMD's io_util: square centre crop (floor offsets), PIL bicubic to `size`, /255,
    then CLIP mean/std (the CLIP image processor with resize and crop off)."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    top, left = (h - side) // 2, (w - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((size, size), resample=Image.BICUBIC)
    return clip_normalize(np.asarray(image, np.float32) / 255.0)
