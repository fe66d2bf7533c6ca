"""Reading the evaluation embedders' weight files, and checked assignment onto Flax trees.

Weights come only from paths the user configures. Accepted files:
  * a `.safetensors` or `.npz` file of named arrays;
  * a torch checkpoint (`.pth`, `.pt`, `.bin`, `.ckpt`) when torch is installed, read with
    `weights_only=True` (argparse `Namespace` allowed, which training scripts store);
    a `model_state_dict` / `state_dict` entry is used when present;
  * a Hugging Face folder (`config.json` plus `model.safetensors`, a sharded
    `model.safetensors.index.json`, `flax_model.msgpack` or `pytorch_model.bin`).
Nothing is downloaded and nothing falls back to random weights: a missing file, a missing
array or a wrong shape raises an error naming the metric, the path and the first wrong key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
Flat = dict[str, np.ndarray]


class WeightsError(ValueError):
    """A weight file that cannot serve a metric: wrong format, missing or mismatched key."""


def _require(metric: str, path: str) -> None:
    if not path:
        raise FileNotFoundError(
            f"{metric}: no weights configured (set the eval.{metric}_weights path; "
            "nothing is downloaded)"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"{metric}: weights not found at {path!r}")


def _flatten_nested(tree: Mapping[str, Any], prefix: str = "") -> Flat:
    flat: Flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_nested(value, name + "."))
        else:
            flat[name] = np.asarray(value)
    return flat


def _torch_to_numpy(value: Any) -> np.ndarray:
    import torch

    if value.dtype in (torch.float16, torch.bfloat16):
        value = value.float()
    return value.detach().cpu().numpy()


def read_torch(path: str, metric: str) -> Flat:
    """The tensors of a torch checkpoint; a nested `model_state_dict`/`state_dict` wins."""
    try:
        import torch
    except ImportError as e:
        raise WeightsError(
            f"{metric}: {path!r} is a torch checkpoint but torch is not installed; convert it "
            "to .safetensors (same key names) where torch is available"
        ) from e
    import argparse
    import pickle

    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
            raise WeightsError(f"{metric}: cannot read torch checkpoint {path!r}: {e}") from e
    for entry in ("model_state_dict", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(entry), Mapping):
            obj = obj[entry]
            break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{metric}: {path!r} holds a {type(obj).__name__}, not a state dict")
    return {k: _torch_to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_safetensors(path: str) -> Flat:
    from safetensors.numpy import load_file

    return dict(load_file(path))


def read_npz(path: str) -> Flat:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def read_file(path: str, metric: str) -> Flat:
    """Named arrays of a single weight file (.safetensors, .npz, .msgpack or torch)."""
    _require(metric, path)
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith(".npz"):
        return read_npz(path)
    if path.endswith(".msgpack"):
        from flax.serialization import msgpack_restore

        with open(path, "rb") as f:
            return _flatten_nested(msgpack_restore(f.read()))
    if path.endswith(TORCH_SUFFIXES):
        return read_torch(path, metric)
    raise WeightsError(
        f"{metric}: unsupported weight file {path!r}; expected .safetensors, .npz, .msgpack "
        f"or a torch checkpoint ({', '.join(TORCH_SUFFIXES)})"
    )


def read_hf_folder(path: str, metric: str) -> tuple[dict[str, Any], Flat]:
    """`config.json` and the arrays of a Hugging Face model folder.

    Prefers `model.safetensors` (or its sharded index), then `flax_model.msgpack`, then
    `pytorch_model.bin` (needs torch).
    Safetensors keys use PyTorch names (`...weight`); msgpack keys Flax names (`...kernel`).
    """
    _require(metric, path)
    if not os.path.isdir(path):
        raise WeightsError(f"{metric}: expected a Hugging Face model folder, got file {path!r}")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{metric}: {path!r} has no config.json")
    with open(config_path) as f:
        config = json.load(f)
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    msgpack = os.path.join(path, "flax_model.msgpack")
    if os.path.exists(single):
        return config, read_safetensors(single)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        flat: Flat = {}
        for shard in shards:
            flat.update(read_safetensors(os.path.join(path, shard)))
        return config, flat
    if os.path.exists(msgpack):
        return config, read_file(msgpack, metric)
    if os.path.exists(torch_bin := os.path.join(path, "pytorch_model.bin")):
        return config, read_file(torch_bin, metric)
    raise FileNotFoundError(
        f"{metric}: {path!r} has none of model.safetensors(.index.json), flax_model.msgpack, "
        "pytorch_model.bin"
    )


def strip_prefix(flat: Flat, prefix: str) -> Flat:
    """Drops `prefix` from every key when all keys carry it (DataParallel's `module.`)."""
    if flat and all(k.startswith(prefix) for k in flat):
        return {k[len(prefix) :]: v for k, v in flat.items()}
    return flat


def path_name(path: tuple[Any, ...]) -> str:
    """'a/b/c' for a pytree key path of dict keys."""
    return "/".join(str(getattr(p, "key", p)) for p in path)


# A source for one Flax leaf: (name in the file, transform of that array to the leaf).
Source = tuple[str, Callable[[np.ndarray], np.ndarray]]


def assign(
    expected: Any,
    flat: Flat,
    source_for: Callable[[str], Source],
    metric: str,
    path: str,
) -> Any:
    """Builds a Flax parameter tree shaped like `expected` from the file's arrays.

    Args:
      expected: a tree of arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).
      flat: the file's arrays by name.
      source_for: maps a leaf's 'a/b/c' path to its file name and transform.
      metric, path: named in errors.

    Returns:
      The tree with float32 NumPy leaves.

    Raises:
      WeightsError: naming the first (in tree order) missing or mismatched key.
    """

    def one(key_path, leaf):
        name = path_name(key_path)
        source, transform = source_for(name)
        if source not in flat:
            raise WeightsError(
                f"{metric}: {path!r} has no array {source!r} (for parameter {name}, "
                f"shape {tuple(leaf.shape)})"
            )
        value = np.asarray(transform(flat[source]), np.float32)
        if value.shape != tuple(leaf.shape):
            raise WeightsError(
                f"{metric}: {path!r} array {source!r} has shape {flat[source].shape}, which "
                f"gives {value.shape} for parameter {name}; expected {tuple(leaf.shape)}"
            )
        return value

    return jax.tree_util.tree_map_with_path(one, expected)


def save_flat(path: str, flat: Flat) -> None:
    """Writes named arrays as .safetensors or .npz (e.g. a torch state dict, converted)."""
    flat = {k: np.ascontiguousarray(v) for k, v in flat.items()}
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(flat, path)
    elif path.endswith(".npz"):
        np.savez(path, **flat)
    else:
        raise ValueError(f"save_flat writes .safetensors or .npz, not {path!r}")


WEIGHT_SUFFIXES = (".safetensors", ".msgpack", ".npz", *TORCH_SUFFIXES)


def weight_files(path: str) -> list[str]:
    """The weight files behind a configured path: the file itself, or a folder's weight
    files (any depth, sorted), e.g. an HF folder's `model.safetensors` shards."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no weight file or folder at {path!r}")
    found = []
    for root, _, names in os.walk(path):
        found += [os.path.join(root, n) for n in names if n.endswith(WEIGHT_SUFFIXES)]
    return sorted(found)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (weight files can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_weights(path: str, hashed: dict[str, str] | None = None) -> dict[str, str]:
    """`{file: sha256}` for the weight files of `path`; `hashed` (by absolute path) skips
    files another metric already hashed in this run, and is filled in."""
    hashed = {} if hashed is None else hashed
    result = {}
    for file in weight_files(path):
        key = os.path.abspath(file)
        if key not in hashed:
            hashed[key] = sha256_file(file)
        result[file] = hashed[key]
    return result
