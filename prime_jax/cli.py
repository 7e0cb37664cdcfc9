"""What the command-line entry points (`main`, `evaluate`) share: quiet start-up, flag parsing
whose mistakes print one line, and the one-line error exit.

A user's mistake (an unknown `--config.field`, a missing config file, a workdir that cannot be
written, data with no usable rows, a misspelt benchmark) ends with one line on stderr,
``prime_jax.<tool>: error: ...``, and exit status 2, as absl and argparse tools do for usage
errors. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from absl import flags
from ml_collections import config_flags

from prime_jax.config_fields import format_fields, section_docs, unknown_field_message


def quiet_startup() -> None:
    """Silences start-up lines that say nothing to a CPU/GPU user: jax's "Unable to initialize
    backend 'tpu' ... libtpu.so" (it probes every platform) and transformers' "PyTorch was not
    found" advice (prime-jax never needs torch). Call before jax or transformers start."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def fail(tool: str, message: str, code: int = 2) -> NoReturn:
    """One line on stderr and exit `code` (2: a usage or input error)."""
    print(f"prime_jax.{tool}: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # No interpreter shutdown: after a failed checkpoint read, orbax's worker threads and unawaited
    # coroutines would print their tracebacks below this line while Python exits.
    os._exit(code)


def interrupted(tool: str, message: str) -> NoReturn:
    """Ctrl-C: one line on stderr, ``prime_jax.<tool>: interrupted (Ctrl-C): <message>``, and exit
    130 (the shell's status for a command stopped by SIGINT), with no traceback."""
    print(f"prime_jax.{tool}: interrupted (Ctrl-C): {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)  # as `fail`: no interpreter shutdown, whose worker threads would print below the line


def flag_error(error: BaseException, argv: Sequence[str]) -> str:
    """One line for a mistake in the flags (see `flags_parser`)."""
    if isinstance(error, (AttributeError, KeyError)):
        # ml_collections' KeyError text is the repr of "'name'\nDid you mean ...": take the name only.
        while isinstance(error, AttributeError) and error.args and isinstance(error.args[0], KeyError):
            error = error.args[0]
        text = str(error.args[0]) if error.args else ""
        name = text.split("\n")[0].strip("'\"")
        return unknown_field_message(argv, name)
    text = str(error)
    if "Traceback (most recent call last)" in text:  # ml_collections quotes the config file's traceback
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        text = f"{text.splitlines()[0].rstrip(': ')}: {last}"
    missing = re.search(r"\[Errno 2\] No such file or directory: '([^']*)'", text)
    if missing:
        return f"config file {missing.group(1)!r} not found (No such file or directory)"

    if isinstance(error, flags.Error):
        return " ".join(text.split())
    return f"cannot load the flags/config: {' '.join(text.split())}"


FLAG_ERRORS = (AttributeError, KeyError, OSError, ImportError, SyntaxError, TypeError, ValueError)


def define_config_flag(tool: str, default: str, help_text: str):
    """`--config` (an ml_collections config file with `--config.section.field=value` overrides).

    The default file and its overrides are parsed when the flag is defined, at import; a mistake
    there (an unknown field, a value of the wrong type) ends with one line, like `flags_parser`.
    """
    try:
        return config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)
    except FLAG_ERRORS as e:
        fail(tool, flag_error(e, sys.argv))


def config_value(tool: str, flag):
    """The parsed config of `define_config_flag`'s flag. A config file that failed to load is only
    reported when first used (ml_collections keeps a placeholder that raises): report it here."""
    try:
        config = flag.value
        config.name  # noqa: B018 - raises for the placeholder of a config that did not load
    except FLAG_ERRORS as e:
        fail(tool, flag_error(e, sys.argv))
    return config


HELP_ARGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def define_list_fields_flag():
    """`--list_fields`: print every config field (grouped by section, with its value, default and
    meaning) and exit 0."""
    return flags.DEFINE_bool("list_fields", False, "Print every field of --config (grouped by section, with its "
                             "value, the default where the config changes it, and what it means) and exit.")


def print_text(text: str) -> None:
    """Prints `text` (a help or a listing) on stdout; a reader that stops early (`--help | head`)
    is not an error: no BrokenPipeError traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more reaches the closed pipe


def list_fields(config, argv: Sequence[str], default_config: str) -> None:
    """What `--list_fields` prints (`config_fields.format_fields` of the loaded config)."""
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "") or _shown(default_config)
    print_text(format_fields(config, config_name=name))  # `--list_fields | head` included


def _shown(path: str) -> str:
    """A file of the repository relative to its root (configs/tiny.py), else as given."""
    root, p = Path(__file__).resolve().parent.parent, Path(path)
    return str(p.relative_to(root)) if p.is_relative_to(root) else path


def help_text(tool: str, doc: str, flag_names: Sequence[str], default_config: str = "", flag_values=None) -> str:
    """`--help` of a CLI: its docstring, then `--config` (how to set and list fields) and its own
    flags (`flag_names`, of `flag_values`, default absl's FLAGS) with their defaults. absl's own
    `--help` exits 1 and does not show `--config`. default_config "": --config is required."""
    flag_values = flags.FLAGS if flag_values is None else flag_values

    def block(head: str, text: str) -> list[str]:
        return [f"  {head}", *textwrap.wrap(text, 96, initial_indent="      ", subsequent_indent="      ")]

    shown = f"Default: {_shown(default_config)}." if default_config else "Required."
    sections = ", ".join(s for s in section_docs() if "." not in s)
    lines = [doc.strip(), "", "flags:"]
    lines += block("--config=FILE[:ARG]",
                   f"The run's config: a Python file whose get_config() returns prime_jax.config.base_config() "
                   f"with changes (configs/tiny.py, configs/qwen7b.py; ':ARG' picks a preset, e.g. "
                   f"configs/qwen7b.py:v5p-32). {shown}")
    lines += block("--config.SECTION.FIELD=VALUE",
                   "Sets one field, e.g. --config.total_steps=30 --config.rollout.n=8 "
                   "--config.algo.estimator=outcome_rloo. Top-level fields: name, seed, total_steps, eval_every, "
                   f"checkpoint_every; sections: {sections}.")
    lines += block("--list_fields",
                   f"Lists every field of the config (python -m prime_jax.{tool} --config=FILE --list_fields), "
                   "grouped by section, with its value, the default where the config changes it, and what it "
                   "means; then exits.")
    for name in flag_names:
        if name in ("config", "list_fields"):
            continue
        flag = flag_values[name]
        kind = "[no]" if flag.boolean else ""
        value = "" if flag.boolean else "=" + {"int": "N", "float": "X"}.get(flag.flag_type(), "VALUE")
        default = f" (default: {flag.default!r})" if flag.default not in (None, "", False) else ""
        lines += block(f"--{kind}{name}{value}", f"{flag.help}{default}")
    lines += ["", "Mistakes (an unknown field, a bad value, a missing file) end with one line "
              f"'prime_jax.{tool}: error: ...' and exit status 2."]
    return "\n".join(lines)


def flags_parser(tool: str, help_text: str = "") -> Callable[[Sequence[str]], list[str]]:
    """An `app.run(..., flags_parser=...)` parser that turns every flag mistake into one line, and
    answers `--help` / `-h` with `help_text` on stdout and exit 0.

    absl prints only `flags.Error`s briefly; ml_collections' config flags raise AttributeError
    (unknown field), KeyError, IOError (missing config file) or TypeError (wrong type) with a
    long traceback instead.
    """

    def parse(argv: Sequence[str]) -> list[str]:
        if help_text and any(a in HELP_ARGS for a in argv[1:]):
            print_text(help_text)
            sys.exit(0)
        try:
            return flags.FLAGS(list(argv))
        except flags.Error as e:
            fail(tool, flag_error(e, argv))
        except FLAG_ERRORS as e:
            fail(tool, flag_error(e, argv))

    return parse


def ensure_writable(folder: str | os.PathLike, what: str) -> Path:
    """Creates `folder` (and parents) and proves a file can be written in it; raises
    PermissionError / OSError naming `what` otherwise. Cheap, so CLIs call it before hours of work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_probe_"):
            pass
    except OSError as e:
        raise PermissionError(f"{what} {str(folder)!r} is not writable ({e.strerror or e})") from None
    return folder
