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
