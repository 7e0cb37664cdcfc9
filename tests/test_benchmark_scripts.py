"""The benchmark commands of benchmarks/README.md run as written from a fresh clone after the
README's install (prime_jax not pip-installed, no PYTHONPATH): issue 14, item 14."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_documented_benchmark_commands_start_from_a_fresh_clone():
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    scripts = sorted(set(re.findall(r"`python (benchmarks/\w+\.py)", readme)))
    # every script in benchmarks/ is documented with its command
    assert scripts == sorted(f"benchmarks/{p.name}" for p in (ROOT / "benchmarks").glob("*.py")), scripts
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    for script in scripts:  # --help imports everything the script needs, then exits
        proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (script, proc.stderr[-2000:])


def test_sampler_times_transformers_in_a_child_process_without_jax(tmp_path):
    """`benchmarks/sampler.py --hf-child` (what the real-model workload runs for transformers): a fresh
    interpreter that never imports jax, timing `generate` on the job's prompts; a tiny random model."""
    import json

    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "model")
    job = dict(folder=str(tmp_path / "model"), dtype="float32", threads=1, prompts=[[5, 6, 7], [8, 9]], n=2,
               new_tokens=6, stop_ids=[3])
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "benchmarks/sampler.py", "--hf-child", str(tmp_path / "job.json"),
                           str(tmp_path / "out.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert len(result["lengths"]) == 4 and all(1 <= n <= 6 for n in result["lengths"])
    assert result["steps"] <= 5 and result["wall"] > 0 and result["threads"] == 1
    assert result["jax_imported"] is False
