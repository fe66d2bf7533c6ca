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


def token_file(index: int) -> str:
    """The embeddings file of the `index`-th of several learned tokens."""
    return f"learned_embeds_{index}.safetensors"


def save_learned_tokens(output_dir: str, placeholders: list[str], rows: jax.Array) -> list[str]:
    """Writes learned tokens (`rows` [n, D], one per placeholder); returns the files.

    One token: `save_learned_embeds`. Several (`data.styles`): diffusers' format holds one
    token per file, so token k goes to `learned_embeds_<k>.safetensors` and
    `textual_inversion.json` lists `{"tokens": [{"placeholder_token", "weight_name"}]}` in
    order; `pipe.load_textual_inversion([paths], token=[placeholders])` loads them all.
    """
    rows = to_numpy(rows)
    if len(placeholders) != len(rows):
        raise ValueError(f"{len(placeholders)} placeholders for {len(rows)} embedding rows")
    if len(placeholders) == 1:
        return [save_learned_embeds(output_dir, placeholders[0], rows[:1])]
    os.makedirs(output_dir, exist_ok=True)
    paths, listed = [], []
    for k, (placeholder, row) in enumerate(zip(placeholders, rows, strict=True)):
        path = os.path.join(output_dir, token_file(k))
        save_file({placeholder: row[None].astype(np.float32)}, path, metadata={"format": "pt"})
        paths.append(path)
        listed.append({"placeholder_token": placeholder, "weight_name": token_file(k)})
    write_json(os.path.join(output_dir, EMBEDS_INFO_FILE), {"tokens": listed})
    return paths
