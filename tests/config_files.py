"""The repository's files that are not importable packages (configs/<name>.py, benchmarks/*.py) as the
tests load them, with dotted overrides for configs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_at(relative_path: str, name: str):
    """The Python file ROOT/relative_path executed as a module called `name`."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_module(name: str = "tiny"):
    """The module of configs/<name>.py (its get_config(), presets, ...)."""
    return module_at(f"configs/{name}.py", f"{name}_config")


def load_config(name: str = "tiny", overrides: dict | None = None):
    """configs/<name>.py's get_config() with `overrides` ({"section.field": value}) set (not validated)."""
    config = config_module(name).get_config()
    for key, value in (overrides or {}).items():
        *path, field = key.split(".")
        section = config
        for part in path:
            section = section[part]
        section[field] = value
    return config
