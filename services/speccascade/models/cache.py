"""The local model cache (`$SPECCASCADE_CACHE`, default `~/.cache/speccascade`): converted model
directories, each finished by a marker file written last (an interrupted conversion is redone; a
finished one is found again without importing torch), under a lock per model (two replicas starting
on one host convert once)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from .catalog import ModelSourceError
from .gguf import convert_gguf

MARKER_NAME = ".speccascade-complete.json"


def cache_dir() -> Path:
    env = os.environ.get("SPECCASCADE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "speccascade"


def marker_ok(out: Path) -> bool:
    return (out / MARKER_NAME).is_file() and (out / "config.json").is_file()


@contextlib.contextmanager
def locked(cache: Path, key: str) -> Iterator[None]:
    # Serialises concurrent resolutions of the same model (e.g. two replicas starting on one host).
    locks = cache / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{key}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_marker(out: Path, info: dict) -> None:
    info = {**info, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = out / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out / MARKER_NAME)


def convert_into(gguf: Path, out: Path, *, source: str, progress: bool, marker: dict) -> None:
    """Convert into a scratch directory, move it into place, then write the marker."""
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        convert_gguf(gguf, scratch, progress=progress, source=source)
        if out.exists():
            shutil.rmtree(out)  # an unfinished earlier attempt (no marker)
        os.replace(scratch, out)
    except ModelSourceError:
        raise
    except Exception as exc:
        raise ModelSourceError(
            f"model source {source!r}: converting {str(gguf)!r} to safetensors failed: {exc!r}. "
            "Is it a GGUF of an architecture transformers supports?"
        ) from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_marker(out, marker)
