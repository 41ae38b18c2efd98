"""Pack what the served system needs on a lent GPU machine that has Python, torch and
transformers but no Ray, pydantic or FastAPI (and no network): wheels for its Python, Ray's
stripped of what serving never loads, into one folder small enough to travel with the working
tree (the device tool carries at most 64 MiB in all).

    python scripts/pack_device_carry.py                  # .device/wheels for Python 3.12, x86_64, and
                                                         # .device/tokenizer (Qwen2.5's)
    python scripts/pack_device_carry.py --python 3.11    # for this machine's Python (to try it here)

On the device (docs/gpu.md):

    python3 -m venv --system-site-packages /tmp/sc && /tmp/sc/bin/pip install --no-index --no-deps .device/wheels/*.whl
    PYTHONPATH=services /tmp/sc/bin/python -m speccascade.cli bench serve ...

Ray's wheel for CPython 3.12 is about 79 MB; most of it is what serving does not use: the Java
worker's jars (31 MB), the dashboard's built web client, and the libraries for training, tuning,
RL and data (`ray.rllib`, `ray.tune`, `ray.train`, `ray.data`, ...). Those are removed from the
wheel (its RECORD rewritten to match), which is then recompressed. The other wheels are the
packages `ray[serve]` and speccascade's serving path import that the device's image lacks.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20

# What serving imports and the device's image (KINDS.md in the device tool's library) does not
# have. Pure-Python wheels where they exist; the rest for the target's Python and platform.
DEVICE_MISSING = [
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection",  # Serve's config models, ours
    "fastapi", "starlette", "uvicorn",  # Serve's HTTP proxy and our OpenAI routes
    "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",  # Ray's runtime-env validation
    "grpcio-health-checking", "grpcio-reflection",  # our gRPC health service; Serve's reflection
    "aiohttp-cors", "colorful", "opencensus", "opencensus-context", "google-api-core", "googleapis-common-protos",
    "proto-plus", "google-auth", "cachetools", "pyasn1", "pyasn1-modules", "rsa",  # Ray's metrics agent
    "smart-open", "wrapt", "watchfiles", "virtualenv", "distlib", "platformdirs", "mmh3",  # ray[serve]'s own list
    "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-proto", "opentelemetry-exporter-prometheus",
    "opentelemetry-semantic-conventions", "importlib-metadata", "zipp", "py-spy",
]
# Parts of Ray that serving never loads (paths inside the wheel).
RAY_STRIP = (
    "ray/jars/",  # the Java worker
    "ray/dashboard/client/build/",  # the dashboard's built web client
    "ray/rllib/", "ray/tune/", "ray/train/", "ray/data/", "ray/air/examples/", "ray/workflow/",
    "ray/cpp/",  # the C++ API's headers and libraries
    "ray/serve/llm/",  # Ray Serve LLM (vLLM integration)
    "ray/llm/",
    "ray/tests/",
)


def pip_download(requirements: list[str], dest: Path, python: str) -> None:
    version = python.replace(".", "")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", version, "--implementation", "cp", "--abi", f"cp{version}", "--abi", "abi3",
               "--abi", "none", "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
               "--platform", "manylinux_2_28_x86_64", "--platform", "any", "--dest", str(dest), *requirements]
    subprocess.run(command, check=True)


def record_line(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def strip_wheel(wheel: Path, prefixes: tuple[str, ...]) -> tuple[int, int]:
    """Remove the files under `prefixes` from `wheel` (in place), with its RECORD rewritten to the
    files kept; returns (bytes before, bytes after)."""
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as source:
        kept = [info for info in source.infolist() if not info.filename.startswith(prefixes)]
        record_name = next(info.filename for info in kept if info.filename.endswith(".dist-info/RECORD"))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as target:
            rows = []
            for info in kept:
                if info.filename == record_name:
                    continue
                data = source.read(info)
                target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
                rows.append(record_line(info.filename, data))
            out = io.StringIO()
            csv.writer(out, lineterminator="\n").writerows([*rows, [record_name, "", ""]])
            target.writestr(record_name, out.getvalue())
    wheel.write_bytes(buffer.getvalue())
    return before, wheel.stat().st_size


def save_tokenizer(directory: Path) -> None:
    """The packaged drafter's tokenizer files (a few MiB), which a GPU machine without network cannot
    fetch: `bench serve --shapes ... --tokenizer .device/tokenizer` builds its models with it."""
    from speccascade.models import DRAFTER_DEFAULT, resolve_model
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(resolve_model(DRAFTER_DEFAULT).path).save_pretrained(directory)


def main(argv: list[str] | None = None) -> int:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the device's Python (default 3.12)")
    parser.add_argument("--out", type=Path, default=REPO / ".device" / "wheels")
    parser.add_argument("--budget-mib", type=float, default=50.0, help="fail if the carry is larger")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as scratch:
        pip_download([f"ray=={ray.__version__}"], Path(scratch), args.python)
        (wheel,) = Path(scratch).glob("ray-*.whl")
        before, after = strip_wheel(wheel, RAY_STRIP)
        wheel.rename(args.out / wheel.name)
        print(f"ray {ray.__version__}: {before / MIB:.1f} MiB -> {after / MIB:.1f} MiB stripped")
    pip_download(DEVICE_MISSING, args.out, args.python)
    tokenizer = args.out.parent / "tokenizer"  # Qwen2.5's, for random-weight models of real shapes there
    save_tokenizer(tokenizer)
    total = sum(w.stat().st_size for w in args.out.glob("*.whl")) + sum(
        f.stat().st_size for f in tokenizer.iterdir())
    print(f"{len(list(args.out.glob('*.whl')))} wheels, {total / MIB:.1f} MiB in {args.out}")
    if total > args.budget_mib * MIB:
        print(f"over the budget of {args.budget_mib:g} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
