"""What every PyTorch-facing writer shares: arrays off the devices, the embeddings file.

`export.py` (a diffusers pipeline folder) and `lora_export.py` (LoRA weights) both write
for PyTorch tools; both get their arrays here and write a learned token here, so neither
imports the other's internals.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

# diffusers' default weight name for `pipe.load_textual_inversion(folder)`.
EMBEDS_FILE = "learned_embeds.safetensors"
# Names the placeholder and the weights file, for readers that want the token's name
# without opening the safetensors file.
EMBEDS_INFO_FILE = "textual_inversion.json"


def to_numpy(x: jax.Array) -> np.ndarray:
    """`x` as a host NumPy array, gathered from all processes if it spans several."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def write_json(path: str, data: dict) -> None:
    """Writes `data` as sorted, indented JSON, creating the folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def save_learned_embeds(output_dir: str, placeholder: str, row: jax.Array) -> str:
    """Writes a learned token as diffusers' textual-inversion format; returns its path.

    `output_dir/learned_embeds.safetensors` holds `{placeholder: [1, D]}` in float32
    (what `pipe.load_textual_inversion(output_dir)` reads), and
    `output_dir/textual_inversion.json` names the placeholder and that file.
    """
    path = os.path.join(output_dir, EMBEDS_FILE)
    os.makedirs(output_dir, exist_ok=True)
    save_file({placeholder: to_numpy(row).astype(np.float32)}, path, metadata={"format": "pt"})
    write_json(
        os.path.join(output_dir, EMBEDS_INFO_FILE),
        {"placeholder_token": placeholder, "weight_name": EMBEDS_FILE},
    )
    return path
