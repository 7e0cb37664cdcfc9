"""The one place that decides sharding: a mesh of (data, fsdp, tensor) and logical-axis rules.

Modules name the logical axes of their arrays (`embed`, `heads`, `batch`, ...); this module maps
those names to mesh axes. Change a rule here and every parameter, batch and KV cache follows.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_AXIS_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),  # rows are split over every data-parallel axis
    "embed": "fsdp",  # ZeRO-3 style: weights split along the model dimension
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "head_dim": None,
    "norm": None,
    "seq": None,
    "cache_seq": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a `(data, fsdp, tensor)` mesh; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    for name, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{name} must be a positive size or -1, got {size}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by the fixed axes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh: data*fsdp*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = {math.prod(sizes)} "
            f"but there are {len(devices)} devices"
        )
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # e.g. fake CPU devices without a physical topology
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None] | None, mesh: Mesh, shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry `logical_axes`.

    A mesh axis that does not divide its dimension (e.g. 2 kv heads on tensor=4) is dropped for
    that dimension, so the array is replicated there rather than failing to compile.
    """
    if logical_axes is None:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        rule = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        mesh_axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape.get(a, 1) > 1)
        if shape is not None and mesh_axes:
            # keep the longest prefix of axes whose product divides the dimension
            while mesh_axes and shape[dim] % math.prod(mesh.shape[a] for a in mesh_axes):
                mesh_axes = mesh_axes[:-1]
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None] | None, shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh, shape))


def _is_variable(x) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh):
    """A pytree of NamedShardings matching an `nnx.State` (leaves: Variables with `logical_axes`).

    Returned with the same Variable wrappers as `state`, so it can serve as `out_shardings` of a jit
    that returns the state, or be used with `jax.device_put(state, shardings)`.
    """

    def one(variable):
        axes = getattr(variable, "logical_axes", None)
        return variable.replace(named_sharding(mesh, axes, np.shape(variable.get_value())))

    return jax.tree.map(one, state, is_leaf=_is_variable)


def shard_state(state, mesh: Mesh):
    """Places every leaf of an `nnx.State` with its logical sharding on `mesh`."""
    return jax.device_put(state, state_shardings(state, mesh))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a `[batch, ...]` array: rows over the data axes, the rest replicated."""
    return named_sharding(mesh, ("batch",) + (None,) * (ndim - 1))
