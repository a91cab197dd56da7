"""Meshes and the one table that maps the model's logical axis names onto mesh axes.

Mesh axes: 'data' (pure data parallel, e.g. across slices), 'fsdp' (data parallel with sharded params and optimizer
state, ZeRO-3 style) and 'tensor' (Megatron-style tensor parallel over heads / MLP / vocabulary).
Model code names only logical axes (see models/transformer.py); change the layout here, nowhere else.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")   # mesh axes the batch dimension is split over

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). First match wins in flax.
LOGICAL_AXIS_RULES = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("patch", None),
    ("patch_grid", None),
    ("time", None),
    ("embed_out", None),
)


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Fills the one axis given as -1 with the remaining devices and checks the product."""
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"at most one of mesh.data/fsdp/tensor may be -1, got {tuple(shape)}")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh sizes must be positive or -1, got {tuple(shape)}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh {tuple(shape)}: {num_devices} devices are not divisible by {known}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh data*fsdp*tensor = {math.prod(shape)} but there are {num_devices} devices")
    return tuple(shape)


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh from `config.mesh` (ints, -1 = the remaining devices)."""
    devices = jax.devices() if devices is None else devices
    shape = resolve_mesh_shape(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, len(devices))
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_to_sharding(logical_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Maps a tree of logical PartitionSpecs (from nn.get_partition_spec) to NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
