"""The one place that decides sharding: a mesh of (data, fsdp, tensor) and logical-axis rules.

Modules name the logical axes of their arrays (`embed`, `heads`, `batch`, ...); this module maps
those names to mesh axes. Change a rule here and every parameter, batch and KV cache follows.
"""

from __future__ import annotations

import functools
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
        from jax.experimental import mesh_utils  # optional: older jax

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
    from flax import nnx  # parallel/ sits below models/: flax only for this check

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
    """Places every leaf of an `nnx.State` with its logical sharding on `mesh`. An abstract state
    (`jax.ShapeDtypeStruct` leaves, e.g. from `nnx.eval_shape`) gets the shardings attached
    instead, so planning code runs the same path without memory."""
    shardings = state_shardings(state, mesh)
    leaves = jax.tree.leaves(state)
    if leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    return jax.device_put(state, shardings)


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for any pytree: `nnx.Variable` leaves follow their `logical_axes`,
    everything else (step counters, optax counts) is replicated."""

    def one(x):
        if _is_variable(x):
            return x.replace(named_sharding(mesh, getattr(x, "logical_axes", None), np.shape(x.get_value())))
        return replicated(mesh)

    return jax.tree.map(one, tree, is_leaf=_is_variable)


def with_shardings(tree, shardings):
    """`tree`'s shapes and dtypes as `jax.ShapeDtypeStruct`s carrying `shardings` (a matching tree)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of an array every device holds whole (scalars, PRNG keys, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_shards(mesh: Mesh) -> int:
    """How many shards the rows of a batch are split into (the product of the `batch` rule's axes)."""
    spec = logical_to_spec(("batch",), mesh)[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return math.prod(mesh.shape[a] for a in axes)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a `[batch, ...]` array: rows over the data axes, the rest replicated."""
    return named_sharding(mesh, ("batch",) + (None,) * (ndim - 1))


# ---------------------------------------------------------------------------------------------
# Activation constraints (for model code): a no-op unless a mesh is set with `jax.set_mesh`.
# ---------------------------------------------------------------------------------------------
def constrain(x, logical_axes: Sequence[str | None]):
    """`with_sharding_constraint(x, <logical_axes mapped by the rules>)` under `jax.set_mesh(mesh)`.

    Model code calls this on activations (e.g. the hidden states `("batch", "seq", "embed")`)
    so that GSPMD keeps rows split over the data axes instead of inheriting the FSDP split of a
    weight (which replicates every activation's batch on every device). Without a mesh context
    (plain single-device use, tests) it returns `x` unchanged.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, mesh, x.shape))


def under_mesh(fn, mesh: Mesh):
    """`fn` traced with `mesh` as the abstract mesh, so `constrain` calls in model code (activation
    shardings) take effect inside a jitted program built from it."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


# ---------------------------------------------------------------------------------------------
# Hardware presets and meshes from config
# ---------------------------------------------------------------------------------------------
# HBM per device (GiB) of each accelerator; a "device" is what jax.devices() lists (one TPU chip
# for v4/v5p megacore chips and v5e, one GPU).
HBM_GIB: dict[str, float] = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "h100": 80.0, "cpu": 16.0}
# Peak dense bf16 matmul FLOP/s and HBM bytes/s per device, from the vendors' spec sheets; only the
# plan's rollout-time estimate (prime_jax/plan/rollout_cost.py) reads them.
PEAK_FLOPS: dict[str, float] = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "h100": 989e12}
HBM_BYTES_PER_S: dict[str, float] = {"v4": 1.2e12, "v5e": 0.819e12, "v5p": 2.765e12, "h100": 3.35e12}

# Slices/node groups the 7B recipe targets. `devices` = jax.device_count(); TPU names count
# TensorCores for v4/v5p (2 per chip, so v5p-32 = 16 chips) and chips for v5e.
# `data`/`fsdp`/`tensor`: the mesh (see docs/scale_out.md for how it was chosen with the plan).
MESH_PRESETS: dict[str, dict[str, Any]] = {
    "v5p-32": dict(accelerator="v5p", devices=16, hosts=4, data=1, fsdp=16, tensor=1,
                   gcloud_type="v5p-32", runtime="v2-alpha-tpuv5"),
    "v4-64": dict(accelerator="v4", devices=32, hosts=8, data=1, fsdp=32, tensor=1,
                  gcloud_type="v4-64", runtime="tpu-ubuntu2204-base"),
    "v5e-64": dict(accelerator="v5e", devices=64, hosts=16, data=1, fsdp=64, tensor=1,
                   gcloud_type="v5litepod-64", runtime="v2-alpha-tpuv5-lite"),
    "8xh100": dict(accelerator="h100", devices=8, hosts=1, data=1, fsdp=8, tensor=1,
                   gcloud_type="", runtime=""),
    "16xh100": dict(accelerator="h100", devices=16, hosts=2, data=1, fsdp=16, tensor=1,
                    gcloud_type="", runtime=""),
}


def mesh_preset(name: str) -> dict[str, Any]:
    """The preset called `name` (case-insensitive; `8xH100` == `8xh100`), with `hbm_gib` added."""
    key = name.strip().lower().replace("×", "x")
    if key not in MESH_PRESETS:
        raise ValueError(f"unknown mesh preset {name!r}; known: {sorted(MESH_PRESETS)}")
    preset = dict(MESH_PRESETS[key], name=key)
    preset["hbm_gib"] = HBM_GIB[preset["accelerator"]]
    return preset


def _mesh_section(config):
    mesh = config["mesh"] if "mesh" in config else config
    return mesh


def mesh_sizes_from_config(config, num_devices: int | None = None) -> tuple[int, int, int]:
    """`(data, fsdp, tensor)` from `config.mesh` (or a preset named by `config.mesh.preset`, if that
    field exists and is set), with a -1 resolved against `num_devices` when given."""
    mesh = _mesh_section(config)
    preset = mesh.get("preset", "") if hasattr(mesh, "get") else ""
    if preset:
        p = mesh_preset(preset)
        sizes = [p["data"], p["fsdp"], p["tensor"]]
    else:
        sizes = [int(mesh["data"]), int(mesh["fsdp"]), int(mesh["tensor"])]
    if num_devices is not None and -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes {sizes}")
        sizes[sizes.index(-1)] = num_devices // known
    return tuple(sizes)


def mesh_from_config(config, devices: Sequence[Any] | None = None) -> Mesh:
    """The `(data, fsdp, tensor)` mesh of `config.mesh` over `devices` (default: all devices of
    all processes), ordered by `mesh_utils` for the physical topology."""
    data, fsdp, tensor = mesh_sizes_from_config(config)
    return make_mesh(data, fsdp, tensor, devices=devices)
