"""The one boundary between host memory and device arrays, for one process or many.

Every process of a run executes the same program. Batch data crosses between numpy and
global `jax.Array`s here and nowhere else:

* `put_rows(batch, mesh)`: a batch that every process holds in full on the host (the same values
  everywhere, e.g. rows built from a seeded global prompt order and gathered outcomes) becomes
  global arrays; each process materialises only the shards its own devices hold.
* `global_batch_from_local(rows, mesh)`: the same from process-local rows only
  (`local_batch_rows` says which), for data that no host holds in full.
* `put_replicated(tree, mesh)`: small inputs every device needs (PRNG keys, stop ids, scalars).
* `to_host(tree)`: results back as numpy on every process (sharded arrays are all-gathered).
* `host_share(rows)` / `gather_shares(values, rows)`: host-side work split over processes
  (decoding text and grading): each process takes its share of the rows, and the per-row results
  are gathered so that every process takes the same decisions (filter, refill).
* `any_process(flag)`: a step-boundary vote (preemption: one host got SIGTERM, all stop).

Abstract leaves (`jax.ShapeDtypeStruct`) pass through with the sharding attached, so programs can
be lowered from shapes alone (the memory plan). All of these are collective when the run has several processes: every process must call them in
the same order with the same shapes.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from prime_jax.parallel.mesh import batch_sharding, named_sharding, replicated


def _row_ranges(sharding: NamedSharding, global_rows: int, ndim: int) -> list[tuple[int, int]]:
    """Sorted, merged [start, stop) row ranges that this process's devices hold."""
    def parts(dim: int) -> int:  # how many ways dimension `dim` is split (a valid probe size)
        spec = sharding.spec[dim] if dim < len(sharding.spec) else None
        axes = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
        return int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1

    shape = (global_rows,) + tuple(parts(d) for d in range(1, ndim))
    ranges = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        start, stop, _ = index[0].indices(global_rows)
        ranges.add((start, stop))
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(stop, merged[-1][1]))
        else:
            merged.append((start, stop))
    return merged


def local_batch_rows(mesh: Mesh, global_batch_size: int) -> np.ndarray:
    """Indices of the global batch rows this process must load (for `batch`-sharded arrays).

    With the default rules (rows over `data` x `fsdp`) and one process per host this is one
    contiguous block of `global_batch_size / process_count` rows; in general it is whatever the
    process's devices address (several blocks, or the whole batch when rows are replicated).
    Keep PRIME's groups whole: choose batch sizes so that each block is a multiple of n.
    """
    sharding = batch_sharding(mesh, 1)
    ranges = _row_ranges(sharding, global_batch_size, 1)
    return np.concatenate([np.arange(a, b) for a, b in ranges]) if ranges else np.zeros((0,), np.int64)


def data_shard(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
    """`(shard_index, num_shards)` for a data loader that splits rows into equal contiguous blocks.

    Raises if this process's rows are not one contiguous block of that size (exotic meshes);
    use `local_batch_rows` then.
    """
    rows = local_batch_rows(mesh, global_batch_size)
    if rows.size == 0 or global_batch_size % rows.size:
        raise ValueError(f"process {jax.process_index()} holds {rows.size} of {global_batch_size} rows")
    if not np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size)):
        raise ValueError("this process's batch rows are not contiguous; use local_batch_rows()")
    return int(rows[0] // rows.size), global_batch_size // rows.size


def global_batch_from_local(local_batch: Any, mesh: Mesh, logical_axes: Any = None) -> Any:
    """Global `jax.Array`s from this process's rows of a batch (a pytree of numpy arrays).

    Each leaf `[local_rows, ...]` holds the rows `local_batch_rows(mesh, global_rows)` in order;
    the result is `[global_rows, ...]` with rows sharded by the `batch` rule (or by
    `logical_axes`, a matching pytree of axis-name tuples, when given). In a single-process run
    this is just a sharded `device_put`. Every process must call it with the same structure.
    """
    leaves, treedef = jax.tree.flatten(local_batch)
    if logical_axes is None:
        shardings = [batch_sharding(mesh, np.ndim(x)) for x in leaves]
    else:
        axes = treedef.flatten_up_to(logical_axes)
        shardings = [named_sharding(mesh, a, None) for a in axes]
    out = []
    for x, sharding in zip(leaves, shardings):
        x = np.asarray(x)
        spec = sharding.spec
        if x.ndim == 0 or len(spec) == 0 or spec[0] is None:
            # replicated rows: every process passes the whole array
            out.append(jax.make_array_from_process_local_data(sharding, x, x.shape))
            continue
        global_rows = _global_rows_guess(sharding, x.shape[0], x.ndim)
        out.append(jax.make_array_from_process_local_data(sharding, x, (global_rows,) + x.shape[1:]))
    return jax.tree.unflatten(treedef, out)


def _global_rows_guess(sharding: NamedSharding, local_rows: int, ndim: int) -> int:
    """Global row count implied by `local_rows` per process under `sharding` (uniform shards)."""
    spec = sharding.spec[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec)
    shards = int(np.prod([sharding.mesh.shape[a] for a in axes]))
    # how many distinct row shards this process's devices hold
    probe = _row_ranges(sharding, shards, ndim)
    local_shards = sum(b - a for a, b in probe)
    if local_rows % local_shards:
        raise ValueError(
            f"{local_rows} local rows cannot be split over this process's {local_shards} row shards"
        )
    return local_rows // local_shards * shards


def local_rows_of(global_batch: Any, mesh: Mesh) -> Any:
    """The rows of a full (host-side, numpy) batch that this process would pass to
    `global_batch_from_local` (tests and small datasets that every host can read whole)."""

    def one(x):
        x = np.asarray(x)
        return x[local_batch_rows(mesh, x.shape[0])] if x.ndim else x

    return jax.tree.map(one, global_batch)


def to_host(tree: Any) -> Any:
    """numpy copies of a pytree of (possibly multi-host) arrays, gathered to every process.

    Fully replicated arrays (metrics) are read locally; sharded ones are all-gathered with
    `multihost_utils.process_allgather` (collective: every process must call it).
    """
    def one(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:  # e.g. metrics: every process holds the whole value
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def _shardings(tree: Any, mesh: Mesh, logical_axes: Any) -> list[NamedSharding]:
    leaves, treedef = jax.tree.flatten(tree)
    if logical_axes is None:
        return [batch_sharding(mesh, np.ndim(x)) for x in leaves]
    return [named_sharding(mesh, axes, np.shape(x)) for x, axes in zip(leaves, treedef.flatten_up_to(logical_axes))]


def _place(x: Any, sharding: NamedSharding) -> Any:
    """One leaf as a global array with `sharding`, each process copying only its devices' slices."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x  # already placed
    if isinstance(x, jax.ShapeDtypeStruct):  # abstract (planning): the placement without data
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):  # typed key: place its data
        return jax.random.wrap_key_data(_place(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    x = to_host(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_rows(host_batch: Any, mesh: Mesh, logical_axes: Any = None) -> Any:
    """Global arrays from a pytree of numpy arrays that every process holds in full.

    Rows (dim 0) are sharded by the `batch` rule, or by `logical_axes` (a matching pytree of
    axis-name tuples). Each process copies only the slices its own devices hold, so nothing is
    broadcast between hosts. The values must be the same on every process.
    """
    leaves, treedef = jax.tree.flatten(host_batch)
    shardings = _shardings(host_batch, mesh, logical_axes)
    return jax.tree.unflatten(treedef, [_place(x, sharding) for x, sharding in zip(leaves, shardings)])


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Every leaf replicated on all devices of `mesh` (the same value on every process)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: _place(x, sharding), tree)


def host_share(num_rows: int) -> np.ndarray:
    """The rows (of `num_rows`) this process works on host-side: an equal contiguous share."""
    return np.array_split(np.arange(num_rows), jax.process_count())[jax.process_index()]


def gather_shares(values: Sequence | np.ndarray, num_rows: int) -> np.ndarray:
    """`[num_rows, ...]` on every process from each process's `host_share(num_rows)` results."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values

    most = -(-num_rows // jax.process_count())
    padded = np.zeros((most,) + values.shape[1:], values.dtype)
    padded[: len(values)] = values
    stacked = np.asarray(multihost_utils.process_allgather(padded))  # [processes, most, ...]
    sizes = [len(s) for s in np.array_split(np.arange(num_rows), jax.process_count())]
    return np.concatenate([stacked[p, :size] for p, size in enumerate(sizes)])


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on at least one (a collective vote)."""
    if jax.process_count() == 1:
        return bool(flag)

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


__all__ = [
    "any_process",
    "data_shard",
    "gather_shares",
    "global_batch_from_local",
    "host_share",
    "local_batch_rows",
    "local_rows_of",
    "put_replicated",
    "put_rows",
    "to_host",
]
