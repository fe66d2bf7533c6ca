"""A negatives store written by hand, as `launch/generate_negatives.py` lays it out, for tests
that need one without generating it. Tests import it as `import negative_stores` (pytest puts
`tests/` on `sys.path`)."""

import json
import os

import numpy as np
from PIL import Image

from nsync_jax.data import negatives_store


def write_store(path, ids, size=32):
    """A negatives store holding image k=0 of each id, as generate_negatives lays it out."""
    os.makedirs(os.path.join(path, negatives_store.IMAGES), exist_ok=True)
    with open(os.path.join(path, negatives_store.SETTINGS), "w") as f:
        json.dump({"format": 1, "per_example": 1}, f)
    with open(os.path.join(path, "manifest.jsonl"), "w") as f:
        for i, example_id in enumerate(ids):
            name = negatives_store.image_name(example_id, 0)
            pixels = np.full((size, size, 3), 40 * i % 256, np.uint8)
            Image.fromarray(pixels).save(os.path.join(path, negatives_store.IMAGES, name))
            entry = {
                "id": example_id,
                "k": 0,
                "file": f"{negatives_store.IMAGES}/{name}",
                "caption": "a painting",
                "prompt": "a painting in the style of painting",
                "image_seed": i,
            }
            f.write(json.dumps(entry) + "\n")
    return str(path)
