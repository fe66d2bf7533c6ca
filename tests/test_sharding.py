import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nsync_jax import sharding


def mesh_config(data, fsdp):
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


def test_make_mesh_sizes_and_auto_axes():
    mesh = sharding.make_mesh(mesh_config(2, -1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(sharding.make_mesh(mesh_config(-1, 1)).shape) == {"data": 8, "fsdp": 1}
    with pytest.raises(ValueError, match="does not match"):
        sharding.make_mesh(mesh_config(3, 2))
    with pytest.raises(ValueError, match="both be -1"):
        sharding.make_mesh(mesh_config(-1, -1))


def test_fsdp_spec_picks_largest_divisible_dim():
    assert sharding.fsdp_spec((3, 3, 64, 128), 4) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((320, 77), 4) == P("fsdp", None)
    assert sharding.fsdp_spec((99, 33), 4) == P()  # Nothing divides.
    assert sharding.fsdp_spec((64,), 4) == P()  # Too small to be worth it.
    assert sharding.fsdp_spec((4096,), 1) == P()


def test_global_batch_is_sharded_over_all_devices():
    mesh = sharding.make_mesh(mesh_config(2, 4))
    batch = sharding.global_batch(mesh, {"x": np.arange(16.0).reshape(8, 2)})
    assert batch["x"].shape == (8, 2)
    assert batch["x"].sharding.spec == P(("data", "fsdp"))
    assert len(batch["x"].addressable_shards) == 8
    np.testing.assert_array_equal(batch["x"], np.arange(16.0).reshape(8, 2))
