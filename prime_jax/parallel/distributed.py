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

Data between hosts and devices moves through `prime_jax.parallel.transfer` only. Logging: only
`is_logging_process()` (process 0) writes logs/metrics files. Checkpoints: every process calls
orbax (each writes its own shards).

Host loss: every process watches the others (`parallel.host_watch`); when one shows no sign of
life for `heartbeat_timeout` seconds (config `distributed.heartbeat_timeout`, env
`PRIME_HEARTBEAT_TIMEOUT`, default 100), every other process prints one line naming it and how to
resume, and exits with status 1, so a pod whose host died exits instead of hanging in a
collective. JAX's own coordination service (which would abort with a stack trace) gets a longer
timeout (`host_watch.service_timeout`) and stays the backstop.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
from jax.experimental import multihost_utils

from prime_jax.parallel import host_watch

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
    initialization_timeout, heartbeat_timeout).
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
    heartbeat = _as_int(_get(section, "heartbeat_timeout") or _env("PRIME_HEARTBEAT_TIMEOUT") or 100,
                        "heartbeat_timeout")
    return dict(
        mode=mode,
        coordinator_address=coordinator or None,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=timeout,
        heartbeat_timeout=heartbeat,
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
        heartbeat_timeout_seconds=host_watch.service_timeout(s["heartbeat_timeout"]),
    )
    logger.info(
        "jax.distributed.initialize(coordinator=%s, num_processes=%s, process_id=%s, cluster=%s, heartbeat %ds)",
        s["coordinator_address"], s["num_processes"], s["process_id"], cluster, s["heartbeat_timeout"],
    )
    jax.distributed.initialize(**kwargs)
    from jax._src import distributed as jax_distributed  # the client: the watch's key-value store

    client = getattr(jax_distributed.global_state, "client", None)
    if client is not None and jax.process_count() > 1:
        host_watch.start(client, jax.process_index(), jax.process_count(), s["heartbeat_timeout"])
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


def sync_hosts(name: str) -> None:
    """Barrier across processes (no-op in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


__all__ = [
    "distributed_settings",
    "initialize_distributed",
    "is_logging_process",
    "process_info",
    "shutdown_distributed",
    "sync_hosts",
]
