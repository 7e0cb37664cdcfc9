"""Two processes on localhost (jax.distributed, 2 CPU devices each) train like one process with 4.

Each worker (this file run as a script) starts jax.distributed through
`prime_jax.parallel.initialize_distributed` (coordinator 127.0.0.1:<free port>, env config),
builds a (data=2, fsdp=2) mesh over the 4 global devices, loads only its own rows of a fixed
synthetic batch (`local_rows_of` + `global_batch_from_local`) and runs two PRIME iterations of
the trainer's jitted steps: score -> PRM update -> policy update. The metrics (and a checksum of
the final parameters) must equal those of a single process with 4 devices.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
N, PROMPT, RESPONSE, ROWS = 2, 8, 8, 16  # n samples/prompt, prompt/response tokens, batch rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_workers(num_processes: int, devices_per_process: int, out_dir: Path) -> list:
    port = _free_port()
    procs = []
    for pid in range(num_processes):
        env = dict(os.environ)
        env.update(
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
            PYTHONPATH=str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        )
        if num_processes > 1:
            env.update(PRIME_DISTRIBUTED="auto", PRIME_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       PRIME_NUM_PROCESSES=str(num_processes), PRIME_PROCESS_ID=str(pid),
                       PRIME_INIT_TIMEOUT="300")
        else:
            for k in ("PRIME_COORDINATOR_ADDRESS", "PRIME_NUM_PROCESSES", "PRIME_PROCESS_ID"):
                env.pop(k, None)
        out = out_dir / f"p{num_processes}_{pid}.json"
        procs.append((subprocess.Popen([sys.executable, __file__, "--worker", str(out)], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out))
    return procs


def _wait(procs: list, timeout: int = 600) -> list[dict]:
    results = []
    try:
        for proc, out in procs:
            log, _ = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"worker failed:\n{log[-6000:]}"
            results.append(json.loads(out.read_text()))
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
    return results


@pytest.mark.timeout(900)
def test_two_processes_match_one(tmp_path):
    single_procs = _start_workers(1, 4, tmp_path)  # all three processes run at the same time
    multi = _wait(_start_workers(2, 2, tmp_path))
    single = _wait(single_procs)[0]
    assert single["process_count"] == 1 and single["global_devices"] == 4
    for r in multi:
        assert r["process_count"] == 2 and r["local_devices"] == 2 and r["global_devices"] == 4
        assert r["initialized"] is True
    assert multi[0]["is_logging"] and not multi[1]["is_logging"]
    assert multi[0]["rows"] == list(range(0, ROWS // 2)) and multi[1]["rows"] == list(range(ROWS // 2, ROWS))
    for r in multi:
        assert set(r["metrics"]) == set(single["metrics"])
        for key, value in single["metrics"].items():
            assert r["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # the PRM and the policy actually learned something (not all-zero updates)
    assert single["metrics"]["it1/policy_grad_norm"] > 0 and single["metrics"]["it1/prm_grad_norm"] > 0


# =============================================================================================
# the worker
# =============================================================================================
def worker(out_path: str) -> None:
    from prime_jax.parallel import initialize_distributed

    initialized = initialize_distributed(None)  # env: PRIME_COORDINATOR_ADDRESS/NUM_PROCESSES/PROCESS_ID

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from prime_jax.models import Qwen2Config, Qwen2ForCausalLM
    from prime_jax.parallel import (global_batch_from_local, is_logging_process, local_batch_rows, local_rows_of,
                                    make_mesh, state_shardings, to_host)
    from prime_jax.train import PrimeBatch, create_train_state, make_train_steps, policy_optimizer, prm_optimizer

    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = make_mesh(2, 2, 1)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    _, abstract_params = nnx.split(abstract, nnx.Param)

    def init_params():  # created directly in its sharded layout on all processes' devices
        return nnx.split(Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)[1]

    params = jax.jit(init_params, out_shardings=state_shardings(abstract_params, mesh))()
    policy_opt, prm_opt = policy_optimizer(lr=1e-3), prm_optimizer(lr=1e-3)
    steps = make_train_steps(abstract, policy_opt, prm_opt, mesh, n=N, micro_batches=2)
    policy_state = create_train_state(params, policy_opt, mesh)
    prm_state = create_train_state(params, prm_opt, mesh)
    ref_params = params

    # A fixed synthetic batch; every process builds it whole and keeps only its own rows.
    rng = np.random.default_rng(0)
    prompt_len = rng.integers(2, PROMPT + 1, ROWS // N).repeat(N)
    response_len = rng.integers(1, RESPONSE + 1, ROWS)
    prompt_mask = (np.arange(PROMPT)[None, :] >= PROMPT - prompt_len[:, None]).astype(np.int32)
    response_mask = (np.arange(RESPONSE)[None, :] < response_len[:, None]).astype(np.int32)
    full = {
        "prompt_ids": (rng.integers(1, 64, (ROWS // N, PROMPT)).repeat(N, axis=0) * prompt_mask).astype(np.int32),
        "prompt_mask": prompt_mask,
        "response_ids": (rng.integers(1, 64, (ROWS, RESPONSE)) * response_mask).astype(np.int32),
        "response_mask": response_mask,
        "outcome": rng.integers(0, 2, ROWS).astype(np.float32),
        "advantages": (rng.standard_normal((ROWS, RESPONSE)) * response_mask).astype(np.float32),
    }
    rows = local_batch_rows(mesh, ROWS)
    batch = PrimeBatch(**global_batch_from_local(local_rows_of(full, mesh), mesh))

    metrics = {}
    for it in range(2):
        scores = steps.score(policy_state.params, prm_state.params, ref_params, batch)
        step_batch = batch.replace(old_logprobs=scores["old_logprobs"], ref_logprobs=scores["ref_logprobs"])
        prm_state, prm_metrics = steps.prm(prm_state, step_batch)
        prm_metrics.pop("q")
        policy_state, policy_metrics = steps.policy(policy_state, step_batch)
        host = to_host({"prm": prm_metrics, "policy": policy_metrics,
                        "old_logprob_sum": jnp.sum(scores["old_logprobs"]),
                        "prm_logprob_sum": jnp.sum(scores["prm_logprobs"])})
        for group in ("prm", "policy"):
            for key, value in host[group].items():
                metrics[f"it{it}/{group}_{key}"] = float(value)
        metrics[f"it{it}/old_logprob_sum"] = float(host["old_logprob_sum"])
        metrics[f"it{it}/prm_logprob_sum"] = float(host["prm_logprob_sum"])
    checksum = jax.jit(lambda p: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(p)))
    metrics["policy_param_sq"] = float(to_host(checksum(policy_state.params)))
    metrics["prm_param_sq"] = float(to_host(checksum(prm_state.params)))

    result = dict(initialized=initialized, process_count=jax.process_count(), local_devices=jax.local_device_count(),
                  global_devices=jax.device_count(), is_logging=is_logging_process(), rows=rows.tolist(),
                  metrics=metrics)
    Path(out_path).write_text(json.dumps(result))
    from prime_jax.parallel import shutdown_distributed

    shutdown_distributed()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
