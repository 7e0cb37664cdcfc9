"""The import layering of docs/architecture.md, read from the code (ast, nothing imported): each part
of prime_jax imports only parts on its own floor or below, with the two exceptions the document names."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "prime_jax"

FLOORS = {  # docs/architecture.md's table, the ground floor first
    1: ("algo", "parallel", "rewards", "data", "kernels", "cache"),
    2: ("models",),
    3: ("sampling", "config"),
    4: ("config_fields", "train"),
    5: ("cli",),
    6: ("eval", "plan"),
    7: ("main", "evaluate"),
}
FLOOR = {part: floor for floor, parts in FLOORS.items() for part in parts}
UPWARD = {  # (file, part it imports from a higher floor): said in docs/architecture.md
    ("train/evaluation.py", "eval"),  # the trainer's held-out eval uses eval/'s library files
    ("config/checks.py", "train"),  # sft.reference_dir's check reads train/checkpoint.params_saved (imported lazily)
}
EVAL_LIBRARY = ("lib.py", "results.py", "prm_scorer.py", "progress.py", "report.py")


def _part(module: str) -> str:
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    """The prime_jax modules a file imports, at its top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("prime_jax."):
            out.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.module == "prime_jax":
            out.update(f"prime_jax.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.startswith("prime_jax."))
    return out


def test_imports_run_down_the_floors():
    upward = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts == ("__init__.py",):
            continue
        me = rel.parts[0].removesuffix(".py")
        assert me in FLOOR, f"{rel}: a new part of prime_jax: give it its floor here and in docs/architecture.md"
        for module in _imports(path):
            other = _part(module)
            if FLOOR[other] > FLOOR[me]:
                upward.add((rel.as_posix(), other))
    assert upward == UPWARD


def test_the_evaluators_library_imports_nothing_from_train():
    """train/ imports eval/'s library files, so they must not import train/ back (no circle)."""
    for name in EVAL_LIBRARY:
        assert not {m for m in _imports(PACKAGE / "eval" / name) if _part(m) in ("train", "plan")}, name
