"""The file-system side of the code sandbox: the Python installation a program needs, and which
directories other users (the sandbox uid) can enter. Used by `sandbox.py` and `sandbox_procs.py`."""

from __future__ import annotations

import os
import stat
import sys
import sysconfig


def python_paths() -> list[str]:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            paths.add(p)
    out = []
    for p in sorted({os.path.realpath(p) for p in paths} | paths):
        if os.path.isdir(p):
            out.append(p)
    return out


def others_can_traverse(path: str) -> str | None:
    """First directory on the way to ``path`` that others cannot enter, or None if all can."""
    cur = "/"
    for part in os.path.abspath(path).strip("/").split("/"):
        if not part:
            continue
        cur = os.path.join(cur, part)
        try:
            st = os.stat(cur)
        except OSError:
            return None
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
            return cur
    return None


def prune_nested(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in sorted(set(paths), key=lambda x: (x.count("/"), x)):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)
