"""parallel/: distributed settings, host-local <-> global batches, meshes from config, constrain."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from prime_jax.config import base_config
from prime_jax.parallel import (
    constrain,
    data_shard,
    distributed_settings,
    global_batch_from_local,
    initialize_distributed,
    is_logging_process,
    local_batch_rows,
    local_rows_of,
    make_mesh,
    mesh_from_config,
    mesh_preset,
    mesh_sizes_from_config,
    process_info,
    to_host,
)

ENV = ("PRIME_DISTRIBUTED", "PRIME_COORDINATOR_ADDRESS", "PRIME_NUM_PROCESSES", "PRIME_PROCESS_ID",
       "PRIME_LOCAL_DEVICE_IDS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
       "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
       "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_settings_from_config_then_env(clean_env):
    c = base_config()
    s = distributed_settings(c)
    assert s["mode"] == "auto" and s["coordinator_address"] is None and s["num_processes"] is None
    assert s["process_id"] is None and s["local_device_ids"] is None and s["initialization_timeout"] == 300

    clean_env.setenv("PRIME_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    clean_env.setenv("PRIME_NUM_PROCESSES", "4")
    clean_env.setenv("JAX_PROCESS_ID", "2")
    clean_env.setenv("PRIME_LOCAL_DEVICE_IDS", "0,1")
    s = distributed_settings(c)
    assert (s["coordinator_address"], s["num_processes"], s["process_id"], s["local_device_ids"]) == (
        "10.0.0.1:1234", 4, 2, [0, 1])

    c.distributed.coordinator_address = "host0:999"
    c.distributed.num_processes = 2
    c.distributed.process_id = 0
    c.distributed.mode = "on"
    s = distributed_settings(c)  # config wins over env
    assert (s["mode"], s["coordinator_address"], s["num_processes"], s["process_id"]) == ("on", "host0:999", 2, 0)

    clean_env.setenv("PRIME_DISTRIBUTED", "bogus")
    with pytest.raises(ValueError, match="distributed.mode"):
        distributed_settings(None)
    clean_env.setenv("PRIME_DISTRIBUTED", "0")
    assert distributed_settings(None)["mode"] == "off"
    assert distributed_settings({"distributed": {"mode": "off"}})["mode"] == "off"


def test_single_process_is_a_no_op(clean_env):
    assert initialize_distributed(base_config()) is False
    assert initialize_distributed(None) is False
    clean_env.setenv("PRIME_NUM_PROCESSES", "1")
    assert initialize_distributed(None) is False
    clean_env.setenv("PRIME_NUM_PROCESSES", "4")  # more processes, but mode=off wins
    assert initialize_distributed({"distributed": {"mode": "off"}}) is False
    assert is_logging_process()
    info = process_info()
    assert info["process_count"] == 1 and info["global_devices"] == jax.device_count()


def _batch(rows):
    rng = np.random.default_rng(0)
    return {
        "ids": rng.integers(0, 100, (rows, 6)).astype(np.int32),
        "mask": (rng.random((rows, 6)) > 0.3).astype(np.int32),
        "outcome": rng.random(rows).astype(np.float32),
    }


@pytest.mark.parametrize("sizes", [(2, 4, 1), (1, 8, 1), (2, 2, 2), (1, 1, 8)])
def test_global_batch_from_local_single_process(sizes):
    mesh = make_mesh(*sizes)
    batch = _batch(16)
    rows = local_batch_rows(mesh, 16)
    np.testing.assert_array_equal(rows, np.arange(16))  # one process holds every row
    assert data_shard(mesh, 16) == (0, 1)
    local = local_rows_of(batch, mesh)
    out = global_batch_from_local(local, mesh)
    for key, value in batch.items():
        assert out[key].shape == value.shape
        np.testing.assert_array_equal(np.asarray(out[key]), value)
        spec = out[key].sharding.spec
        dp = sizes[0] * sizes[1]
        if dp > 1:
            assert spec[0] is not None  # rows split over the data axes
        assert out[key].sharding.shard_shape(value.shape)[0] == 16 // dp
    host = to_host(out)
    np.testing.assert_array_equal(host["ids"], batch["ids"])


def test_global_batch_with_logical_axes():
    mesh = make_mesh(2, 2, 2)
    x = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
    out = global_batch_from_local({"x": x}, mesh, logical_axes={"x": ("batch", "heads")})
    assert out["x"].sharding.spec == PartitionSpec(("data", "fsdp"), "tensor")
    np.testing.assert_array_equal(np.asarray(out["x"]), x)


def test_mesh_from_config_and_presets():
    c = base_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, -1, 1
    mesh = mesh_from_config(c)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert mesh_sizes_from_config(c, 8) == (2, 4, 1)
    c.mesh.preset = "v5p-32"
    assert mesh_sizes_from_config(c) == (1, 16, 1)
    with pytest.raises(ValueError):
        mesh_from_config(c)  # 16 devices asked, 8 here
    assert mesh_preset("v4-64")["hbm_gib"] == 32.0
    assert mesh_preset("v5e-64")["devices"] == 64
    assert mesh_from_config(ml_collections.ConfigDict({"mesh": {"data": -1, "fsdp": 1, "tensor": 2}})).shape["data"] == 4


def test_constrain_is_a_no_op_without_a_mesh_and_shards_with_one():
    x = jnp.ones((8, 4, 16))
    assert constrain(x, ("batch", "seq", "embed")) is x
    mesh = make_mesh(1, 8, 1)

    @jax.jit
    def f(x):
        return constrain(x * 2, ("batch", "seq", "embed"))

    with jax.set_mesh(mesh):
        y = f(x)
    assert y.sharding.spec[0] == "fsdp"  # rows over fsdp; embed dropped (fsdp already used)
    assert y.sharding.shard_shape(y.shape) == (1, 4, 16)


def test_constrain_under_an_abstract_mesh_inside_jit():
    mesh = make_mesh(2, 4, 1)

    def f(x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return constrain(x + 1, ("batch", "seq", "embed"))

    x = jax.device_put(jnp.ones((8, 4, 16)), jax.sharding.NamedSharding(mesh, PartitionSpec()))
    y = jax.jit(f)(x)  # the devices come from the (mesh-placed) input, the spec from the constraint
    assert y.sharding.spec[0] == ("data", "fsdp")
    assert y.sharding.shard_shape(y.shape) == (1, 4, 16)


class _KeyValueStore:
    """The coordination service's key-value calls the host watch makes, in memory (one per pod)."""

    def __init__(self):
        self.values, self.up = {}, True

    def key_value_set(self, key, value, allow_overwrite=False):
        if not self.up:
            raise RuntimeError("UNAVAILABLE: failed to connect")
        self.values[key] = value

    def key_value_dir_get(self, prefix):
        if not self.up:
            raise RuntimeError("UNAVAILABLE: failed to connect")
        return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]

    def key_value_try_get(self, key):
        return self.values[key]


def test_host_watch_names_a_silent_process_and_not_one_that_finished():
    """Three processes: 2 finishes (says so), 1 goes silent: the watch of 0 names 1, not 2; when
    the coordinator goes away, the watch of 1 names it."""
    import time

    from prime_jax.parallel.host_watch import HostWatch, looks_like_a_lost_host

    class Recorded(HostWatch):
        def _lost(self, pid, what):
            self.verdict = (pid, what)
            self._stop.set()

    store = _KeyValueStore()
    watches = [Recorded(store, pid, 3, timeout_s=0.6, interval_s=0.05) for pid in range(3)]
    for w in watches:
        w.start()
    time.sleep(0.3)
    watches[2].stop()  # finished: its silence is no death
    watches[1]._stop.set()  # died: silent, without saying so
    watches[0]._thread.join(timeout=5)
    assert watches[0].verdict[0] == 1, getattr(watches[0], "verdict", None)
    assert watches[0].verdict[1].startswith("process 1 of 3 (host ") and "stopped answering" in watches[0].verdict[1]

    store, lonely = _KeyValueStore(), None
    lonely = Recorded(store, 1, 2, timeout_s=0.3, interval_s=0.05)
    lonely.start()
    store.up = False  # the coordinator (process 0) is gone
    lonely._thread.join(timeout=5)
    assert lonely.verdict[0] == 0 and "the coordinator (process 0) stopped answering" in lonely.verdict[1]
    assert looks_like_a_lost_host(RuntimeError("Gloo AllGather failed: Connection closed by peer"))
    assert not looks_like_a_lost_host(RuntimeError("RESOURCE_EXHAUSTED: out of memory"))
