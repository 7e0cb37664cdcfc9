"""Multi-host start-up and the host <-> global-array boundary.

One process runs per host (TPU VM worker, GPU node, or a CPU process in tests). Every process
runs the same program; `jax.distributed.initialize` connects them, after which `jax.devices()`
lists the devices of *all* hosts and a mesh built from them spans the whole slice.

Call `initialize_distributed(config)` first thing in a CLI, before anything touches a jax
backend (creating an array, `jax.devices()`, ...). It decides from the config and the
environment whether this is a multi-process run:

| source | coordinator | num processes | process id |
|---|---|---|---|
| `config.distributed.*` | `coordinator_address` | `num_processes` | `process_id` |
| env (ours) | `PRIME_COORDINATOR_ADDRESS` | `PRIME_NUM_PROCESSES` | `PRIME_PROCESS_ID` |
| env (JAX) | `JAX_COORDINATOR_ADDRESS` | `JAX_NUM_PROCESSES` | `JAX_PROCESS_ID` |
| auto-detect | Cloud TPU pod slice / SLURM / Open MPI (JAX's cluster detection) |

`config.distributed.mode` (or env `PRIME_DISTRIBUTED`): `auto` (default) initialises when a
coordinator or more than one process is given, or a multi-host cluster is detected; `on` always
initialises (leaving unset values to JAX's auto-detection, e.g. on a TPU pod slice); `off`
never does.

Data: each process loads only the rows its own devices hold (`local_batch_rows`) and
`global_batch_from_local` assembles the global, sharded arrays with
`jax.make_array_from_process_local_data`. Logging: only `is_logging_process()` (process 0)
writes logs/metrics files. Checkpoints: every process calls orbax (each writes its own shards).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from prime_jax.parallel.mesh import batch_sharding

logger = logging.getLogger(__name__)

_MODES = ("auto", "on", "off")


def _get(section: Any, key: str, default=None):
    """`section.key` for a ConfigDict / dict / object / None, else `default` (None-valued too)."""
    if section is None:
        return default
    if isinstance(section, Mapping):
        value = section.get(key, default)
    else:
        try:
            value = section.get(key, default)  # ml_collections.ConfigDict
        except (AttributeError, TypeError):
            value = getattr(section, key, default)
    return default if value is None else value


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return value
    return None


def _as_int(value, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"distributed: {what} must be an integer, got {value!r}") from e


def _as_ids(value) -> list[int] | None:
    if value is None or value == "" or value == ():
        return None
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v.strip()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def distributed_settings(config: Any = None) -> dict[str, Any]:
    """What `initialize_distributed` would use: config values first, then env, else None.

    Returns dict(mode, coordinator_address, num_processes, process_id, local_device_ids,
    initialization_timeout).
    """
    section = _get(config, "distributed") if config is not None else None
    mode = str(_get(section, "mode") or _env("PRIME_DISTRIBUTED") or "auto").lower()
    if mode in ("1", "true", "yes"):
        mode = "on"
    if mode in ("0", "false", "no"):
        mode = "off"
    if mode not in _MODES:
        raise ValueError(f"distributed.mode must be one of {_MODES}, got {mode!r}")
    coordinator = _get(section, "coordinator_address") or _env("PRIME_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
    num_processes = _as_int(
        _get(section, "num_processes") or _env("PRIME_NUM_PROCESSES", "JAX_NUM_PROCESSES"), "num_processes"
    )
    process_id = _get(section, "process_id")
    if process_id is None or process_id == -1:
        process_id = _env("PRIME_PROCESS_ID", "JAX_PROCESS_ID")
    process_id = _as_int(process_id, "process_id")
    local_device_ids = _as_ids(_get(section, "local_device_ids") or _env("PRIME_LOCAL_DEVICE_IDS"))
    timeout = _as_int(_get(section, "initialization_timeout") or _env("PRIME_INIT_TIMEOUT") or 300, "timeout")
    return dict(
        mode=mode,
        coordinator_address=coordinator or None,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=timeout,
    )


def _detected_multihost_cluster() -> str | None:
    """Name of a multi-process environment JAX can auto-configure, else None (no network calls)."""
    hosts = _env("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
    if hosts and len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "cloud_tpu"
    if _env("MEGASCALE_COORDINATOR_ADDRESS"):
        return "cloud_tpu_multislice"
    if (_as_int(_env("SLURM_NTASKS"), "SLURM_NTASKS") or 1) > 1 and _env("SLURM_JOB_ID"):
        return "slurm"
    if (_as_int(_env("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "ompi"
    return None


def initialize_distributed(config: Any = None) -> bool:
    """Starts `jax.distributed` when this is a multi-process run; returns whether it is initialised.

    Safe to call twice and in single-host runs (then a no-op returning False). Must run before the
    first jax backend use. See the module docstring for where the settings come from.
    """
    if jax.distributed.is_initialized():
        return True
    s = distributed_settings(config)
    if s["mode"] == "off":
        return False
    explicit = s["coordinator_address"] is not None or (s["num_processes"] or 1) > 1
    cluster = _detected_multihost_cluster()
    if s["mode"] == "auto" and not explicit and cluster is None:
        return False
    if s["mode"] == "auto" and s["num_processes"] == 1 and s["coordinator_address"] is None:
        return False
    kwargs = dict(
        coordinator_address=s["coordinator_address"],
        num_processes=s["num_processes"],
        process_id=s["process_id"],
        local_device_ids=s["local_device_ids"],
        initialization_timeout=s["initialization_timeout"],
    )
    logger.info(
        "jax.distributed.initialize(coordinator=%s, num_processes=%s, process_id=%s, cluster=%s)",
        s["coordinator_address"], s["num_processes"], s["process_id"], cluster,
    )
    jax.distributed.initialize(**kwargs)
    logger.info(
        "process %d/%d: %d local devices, %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
    return True


def shutdown_distributed() -> None:
    """Disconnects from the coordinator (no-op when not initialised)."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def is_logging_process() -> bool:
    """True on the one process that writes logs, metrics files and plots (process 0)."""
    return jax.process_index() == 0


def process_info() -> dict[str, int]:
    """`{process_index, process_count, local_devices, global_devices}` for log lines."""
    return dict(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_devices=jax.local_device_count(),
        global_devices=jax.device_count(),
    )


# ---------------------------------------------------------------------------------------------
# host-local data <-> global arrays
# ---------------------------------------------------------------------------------------------
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
    from prime_jax.parallel.mesh import named_sharding

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
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:  # e.g. metrics: every process holds the whole value
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def sync_hosts(name: str) -> None:
    """Barrier across processes (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


__all__ = [
    "data_shard",
    "distributed_settings",
    "global_batch_from_local",
    "initialize_distributed",
    "is_logging_process",
    "local_batch_rows",
    "local_rows_of",
    "process_info",
    "shutdown_distributed",
    "sync_hosts",
    "to_host",
]
