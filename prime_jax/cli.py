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
import sys
import tempfile
from pathlib import Path
from typing import Callable, NoReturn, Sequence


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


def _flag_error(error: BaseException, argv: Sequence[str]) -> str:
    """One line for a mistake in the flags (see `flags_parser`)."""
    if isinstance(error, (AttributeError, KeyError)):
        field = str(error).strip("'\"")
        bad = " ".join(a for a in argv[1:] if a.startswith("--config."))
        return f"unknown config field {field!r} ({bad}); the fields are those of prime_jax/config.py base_config()"
    return f"cannot load the flags/config: {' '.join(str(error).split())}"


_FLAG_ERRORS = (AttributeError, KeyError, OSError, ImportError, SyntaxError, TypeError, ValueError)


def define_config_flag(tool: str, default: str, help_text: str):
    """`--config` (an ml_collections config file with `--config.section.field=value` overrides).

    The default file and its overrides are parsed when the flag is defined, at import; a mistake
    there (an unknown field, a value of the wrong type) ends with one line, like `flags_parser`.
    """
    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)
    except _FLAG_ERRORS as e:
        fail(tool, _flag_error(e, sys.argv))


def config_value(tool: str, flag):
    """The parsed config of `define_config_flag`'s flag. A config file that failed to load is only
    reported when first used (ml_collections keeps a placeholder that raises): report it here."""
    try:
        config = flag.value
        config.name  # noqa: B018 - raises for the placeholder of a config that did not load
    except _FLAG_ERRORS as e:
        fail(tool, _flag_error(e, sys.argv))
    return config


def flags_parser(tool: str) -> Callable[[Sequence[str]], list[str]]:
    """An `app.run(..., flags_parser=...)` parser that turns every flag mistake into one line.

    absl prints only `flags.Error`s briefly; ml_collections' config flags raise AttributeError
    (unknown field), KeyError, IOError (missing config file) or TypeError (wrong type) with a
    long traceback instead.
    """

    def parse(argv: Sequence[str]) -> list[str]:
        from absl import flags

        try:
            return flags.FLAGS(list(argv))
        except flags.Error as e:
            fail(tool, str(e))
        except _FLAG_ERRORS as e:
            fail(tool, _flag_error(e, argv))

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
