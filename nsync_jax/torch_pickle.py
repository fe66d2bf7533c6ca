"""Reading PyTorch `.bin` state dicts (`torch.save`'s zip format) without torch.

A `torch.save` file is a zip archive: `<name>/data.pkl` pickles the state dict, and each
tensor's storage is a raw little-endian byte array in `<name>/data/<key>`. In the pickle a
tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and its
storage a persistent id `("storage", torch.FloatStorage, key, location, numel)`.

`TorchFile` unpickles with an allow-list instead of torch: the few globals a state dict
uses are mapped to NumPy stand-ins, and any other global (`os.system`, `builtins.eval`,
any class) is refused with `UnpicklingError` naming the file, so loading a file never runs
code it names. Tensors are read lazily: `shapes()` costs only the pickle,
`read(key)` one storage.

    with TorchFile("unet/diffusion_pytorch_model.bin") as f:
        kernel = f.read("conv_in.weight")  # np.ndarray, float32
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

# Storage classes torch pickles, by the dtype of their elements.
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype
    numel: int


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """A tensor not yet read: a strided view of `numel` elements of a storage."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_):
    # The trailing requires_grad, backward_hooks (and metadata) do not matter for weights.
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"a tensor's storage is a {type(storage).__name__}")
    return _Tensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_):
    return data  # An nn.Parameter's data tensor; requires_grad and hooks dropped.


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals of `_GLOBALS`, and storages by their persistent id."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name} (only state dicts of "
                "tensors are read; convert other files to safetensors)"
            )
        return _GLOBALS[(module, name)]

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage type {storage_type!r} unknown")
        return _Storage(str(key), storage_type.dtype, int(numel))


def _flatten(tree: Any, prefix: str = "") -> dict[str, _Tensor]:
    if isinstance(tree, _Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    what = prefix or "the file"
    raise pickle.UnpicklingError(f"{what} holds a {type(tree).__name__}, not tensors")


class TorchFile:
    """The tensors of one `torch.save` zip file, read without torch (a context manager)."""

    def __init__(self, path: str):
        """Opens `path` and unpickles its state dict (tensors are read later, by key).

        Raises:
          pickle.UnpicklingError: the file is not a zip-format state dict of tensors, or
            its pickle names anything outside the allow-list (named, never called).
        """
        self.path = path
        if not zipfile.is_zipfile(path):
            raise pickle.UnpicklingError(
                f"{path} is not a zip-format torch.save file (torch < 1.6 wrote another "
                "format): convert it to safetensors"
            )
        self._zip = zipfile.ZipFile(path)
        pickles = [n for n in self._zip.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            self._zip.close()
            raise pickle.UnpicklingError(f"{path}: expected one */data.pkl, found {pickles}")
        self._root = pickles[0].removesuffix("data.pkl")
        byteorder = self._root + "byteorder"
        if byteorder in self._zip.namelist() and self._zip.read(byteorder) != b"little":
            self._zip.close()
            raise pickle.UnpicklingError(f"{path}: big-endian tensors are not supported")
        try:
            self._tensors = _flatten(_Unpickler(io.BytesIO(self._zip.read(pickles[0]))).load())
        except Exception as e:  # Whatever a crafted pickle provokes, named with the file.
            self._zip.close()
            raise pickle.UnpicklingError(f"{path}: {e}") from e

    def __enter__(self) -> TorchFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape by state-dict key, without reading any tensor."""
        return {key: tensor.shape for key, tensor in self._tensors.items()}

    def read(self, key: str) -> np.ndarray:
        """The tensor `key` as a NumPy array of its own (contiguous, in its stored dtype)."""
        tensor = self._tensors[key]
        storage = tensor.storage
        data = self._zip.read(f"{self._root}data/{storage.key}")
        # A crafted size/stride must not make `as_strided` read past the storage.
        in_bounds = (
            len(data) >= storage.numel * storage.dtype.itemsize
            and len(tensor.shape) == len(tensor.stride)
            and min((tensor.offset, *tensor.stride)) >= 0
        )
        if in_bounds and 0 not in tensor.shape:
            extent = sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride, strict=True))
            in_bounds = tensor.offset + extent < storage.numel
        if not in_bounds:
            raise pickle.UnpicklingError(f"{self.path}: tensor {key} lies outside its storage")
        elements = np.frombuffer(data, storage.dtype, count=storage.numel)
        view = np.lib.stride_tricks.as_strided(
            elements[tensor.offset :],
            shape=tensor.shape,
            strides=tuple(s * storage.dtype.itemsize for s in tensor.stride),
            writeable=False,
        )
        return np.array(view)
