"""Device mesh and shardings: data parallel plus FSDP on a two-axis `jax.sharding.Mesh`.

Parameters, gradients and optimizer state shard their largest dimension that divides by
the `fsdp` axis size (replicated when none does, e.g. small biases); batches shard their
leading dimension over both axes. The mesh uses Auto axes on purpose: our UNet is
written for GSPMD propagation, and JAX >= 0.10's default Explicit axes would make every
contraction over a sharded dimension an error.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (all by default); -1 takes what is left.

    Devices are grouped by process (stably), so on many hosts each process's devices hold
    one contiguous block of the batch, process p the p-th: the rows `global_batch`
    expects each process to bring.
    """
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: d.process_index)
    data, fsdp = mesh_config.data, mesh_config.fsdp
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp cannot both be -1")
    if data == -1:
        data = len(devices) // fsdp
    if fsdp == -1:
        fsdp = len(devices) // data
    if data < 1 or fsdp < 1 or data * fsdp != len(devices):
        raise ValueError(
            f"mesh data={mesh_config.data} x fsdp={mesh_config.fsdp} does not match "
            f"{len(devices)} devices"
        )
    grid = np.asarray(devices).reshape(data, fsdp)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 1024) -> PartitionSpec:
    """Shards the largest dimension divisible by `fsdp_size`; small leaves stay replicated.

    Leaves under `min_size` elements cost more in collectives than they save in memory.
    """
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
    """FSDP `NamedSharding` for every array (or ShapeDtypeStruct) leaf of `tree`."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(mesh: Mesh, local_batch: Any) -> Any:
    """Global arrays from this process's rows of the batch (one host or many)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def place(tree: Any, shardings: Any) -> Any:
    """Each leaf of `tree` in its sharding of `shardings` (a tree of the same structure).

    On one process this is `jax.device_put`. On many, a leaf this process holds whole (a
    NumPy array, or a JAX array on its own devices, with the same value on every process)
    is cut into the shards of its target, since `jax.device_put` refuses targets on other
    processes' devices; a global array is resharded.
    """

    def one(x, target):
        if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, target)
        return jax.make_array_from_callback(np.shape(x), target, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)
