"""The config's fields as a user looks them up: each field's one-line documentation (the comment
beside it in `prime_jax/config/schema.py`), the listing `--list_fields` prints (grouped by section, with
the loaded config's value and the default), and the "did you mean" of a misspelt
`--config.section.field`.

The documentation is read from schema.py's own source (the comment on the line that sets the
field), so the listing cannot drift from the schema; `tests/test_config.py` checks that every
field has one.
"""

from __future__ import annotations

import difflib
import functools
import io
import re
import tokenize
from pathlib import Path
from typing import Any

from prime_jax.config import base_config, field_names

_ASSIGN = re.compile(r"^\s*(c|o)\.([A-Za-z_][\w.]*)\s*=(?!=)")
_OPTIMIZER_SECTIONS = ("policy_optim", "prm_optim")  # built by config.base_config's optim() helper (`o.<field>`)


@functools.lru_cache(maxsize=1)
def _documentation() -> tuple[dict[str, str], dict[str, str]]:
    """({dotted field: its comment}, {section: the comment above or beside its ConfigDict()})."""
    source = (Path(__file__).parent / "config" / "schema.py").read_text()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    fields: dict[str, str] = {}
    sections: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        match = _ASSIGN.match(line)
        if not match:
            continue
        owner, name = match.groups()
        names = [f"{s}.{name}" for s in _OPTIMIZER_SECTIONS] if owner == "o" else [name]
        if "ConfigDict()" in line:  # a section: its comment, else the comment lines just above it
            above, k = [], number - 1
            while k >= 1 and lines[k - 1].strip().startswith("#"):
                above.insert(0, comments.get(k, ""))
                k -= 1
            sections[name] = comments.get(number) or " ".join(above)
            continue
        for n in names:
            fields[n] = comments.get(number, "")
    for s in _OPTIMIZER_SECTIONS:  # `c.policy_optim = optim(...)  # policy optimizer`
        sections.setdefault(s, fields.pop(s, ""))
    return fields, sections


def field_docs() -> dict[str, str]:
    """{dotted field name: its one-line documentation} for every field of `base_config()`."""
    return dict(_documentation()[0])


def section_docs() -> dict[str, str]:
    """{section name: what it holds} (e.g. "rollout"); top-level fields are in section ""."""
    return dict(_documentation()[1])


def _flatten(config, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value: Any) -> str:
    """A value as typed after `--config.field=` (an empty string as '')."""
    return ("''" if value == "" else value) if isinstance(value, str) else str(value)


def format_fields(config=None, *, config_name: str = "") -> str:
    """Every field grouped by section: `--config.<field>=<value>`, the default of `base_config()`
    where the config changes it, and the field's documentation. `config`: the loaded config
    (default: `base_config()`)."""
    defaults = _flatten(base_config())
    values = _flatten(config) if config is not None else defaults
    docs, sections = _documentation()
    groups: dict[str, list[str]] = {}
    for name in [*docs, *(n for n in defaults if n not in docs)]:  # in schema.py's order
        groups.setdefault(name.rsplit(".", 1)[0] if "." in name else "", []).append(name)
    source = f" of {config_name}" if config_name else ""
    out = [f"Config fields{source}, set with --config.<field>=<value> (lists: comma-separated; "
           "booleans: true/false). 'default' is prime_jax/config/schema.py base_config()'s where the config changes it."]
    for section, names in groups.items():
        title = section or "run"
        about = sections.get(section, "") if section else "the run as a whole"
        out.append("")
        out.append(f"[{title}]" + (f"  {about}" if about else ""))
        width = min(44, max(len(f"{n}={_show(values.get(n))}") for n in names))
        for n in names:
            setting = f"{n}={_show(values.get(n))}"
            changed = f" (default {_show(defaults[n])})" if values.get(n) != defaults[n] else ""
            out.append(f"  --config.{setting:<{width}}  {docs.get(n, '')}{changed}")
    return "\n".join(out)


def unknown_field_message(argv, parsed_name: str = "") -> str:
    """The one line for a misspelt `--config.<field>` in `argv`: which override names no field,
    and the closest field names."""
    known = field_names()
    sections = {n.rsplit(".", 1)[0] for n in known if "." in n}
    given = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    bad = next((g for g in given if g not in known), parsed_name or (given[0] if given else "?"))
    if bad in sections:
        return f"--config.{bad} is a section, not a field: set one of its fields (--list_fields shows them)"
    close = difflib.get_close_matches(bad, known, n=2, cutoff=0.75)
    leaf = bad.rsplit(".", 1)[-1]
    close += [n for n in known if n.rsplit(".", 1)[-1] == leaf and n not in close]  # the right name, wrong section
    hint = f" (did you mean {' or '.join(repr(c) for c in close[:2])}?)" if close else ""
    return f"unknown config field {bad!r}{hint}; --list_fields lists every field"
