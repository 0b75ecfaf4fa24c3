"""Meshes and logical-axis rules: how parameters named with logical axes land on a device mesh.

Model code names each parameter dimension ('embed', 'mlp', 'vocab', ...); a rules table maps each
logical name to a mesh axis (or None for replicated). A dimension that does not divide its mesh
axis is an error naming the parameter: silently replicating it would hide a memory blow-up.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# FSDP over the embedding dimension, tensor parallelism over heads and MLP width; the vision tower
# is small next to the decoder and follows the same pattern with its own names.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vit_embed", "fsdp"),
    ("vit_qkv", "tensor"),
    ("vit_heads", "tensor"),
    ("vit_mlp", "tensor"),
    ("vit_patch", None),
    ("vit_merged", "fsdp"),
    ("vit_merged_out", "tensor"),
)


# The mesh axes a batch's rows (the sampler's prompts, the learner's responses) are split over; the
# 'tensor' axis holds a replica of every row.
BATCH_AXES = ("data", "fsdp")


class ShardingError(ValueError):
    pass


def batch_sharding(mesh: Mesh, rows: int | None = None, *, what: str = "batch") -> NamedSharding:
    """The one sharding of every learner-batch array: its leading (row) axis over BATCH_AXES.

    Every key of a batch gets this same sharding, so it serves as a pytree prefix for a whole batch
    dict in `jax.jit`. With `rows`, a count that does not divide the batch devices is an error naming
    `what` (silently replicating rows would hide a memory blow-up).
    """
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    if rows is not None:
        size = batch_devices(mesh)
        if rows % size:
            raise ValueError(
                f"{what} has {rows} rows, which does not divide the {size} devices of mesh axes {axes}; "
                f"use a batch size that is a multiple of {size}"
            )
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def batch_devices(mesh: Mesh) -> int:
    """How many ways a batch's rows are split: the product of the BATCH_AXES sizes."""
    size = 1
    for a in BATCH_AXES:
        size *= mesh.shape.get(a, 1)
    return size


def logical_to_spec(
    logical_axes, shape, mesh: Mesh, rules=DEFAULT_RULES, *, name: str = "?"
) -> PartitionSpec:
    """PartitionSpec for one array; raises ShardingError naming `name` if a dimension does not divide."""
    table = dict(rules)
    spec = []
    used = set()
    for dim, axis in zip(shape, logical_axes or (None,) * len(shape)):
        mesh_axis = table.get(axis) if axis is not None else None
        axes = () if mesh_axis is None else (mesh_axis if isinstance(mesh_axis, tuple) else (mesh_axis,))
        axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        size = 1
        for a in axes:
            size *= mesh.shape[a]
        if size > 1 and dim % size:
            raise ShardingError(
                f"parameter {name}: dimension {dim} (logical axis '{axis}') does not divide mesh axes "
                f"{axes} of size {size}; change the mesh or the sharding rule for '{axis}'"
            )
        used.update(axes)
        spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*spec)


def named_sharding(logical_axes, shape, mesh: Mesh, rules=DEFAULT_RULES, *, name: str = "?") -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules, name=name))


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one axis may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ShardingError(f"only one mesh axis may be -1, got {free}")
    known = 1
    for k, v in sizes.items():
        if v != -1:
            if v < 1:
                raise ShardingError(f"mesh axis {k} must be >= 1 or -1, got {v}")
            known *= v
    if free:
        if len(devices) % known:
            raise ShardingError(f"{len(devices)} devices cannot be split into mesh {sizes}")
        sizes[free[0]] = len(devices) // known
    total = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    if total != len(devices):
        raise ShardingError(f"mesh {sizes} needs {total} devices, {len(devices)} are available")
    import numpy as np

    grid = np.asarray(devices).reshape(sizes["data"], sizes["fsdp"], sizes["tensor"])
    return Mesh(grid, ("data", "fsdp", "tensor"))
