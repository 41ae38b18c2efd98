"""Pack what the served system needs on a lent GPU machine that has Python, torch and
transformers but no Ray, pydantic or FastAPI (and no network): those packages installed for its
Python into one folder, Ray stripped of what serving never loads, compressed into one file small
enough to travel with the working tree (the device tool carries at most 64 MiB in all).

    python scripts/pack_device_carry.py                  # .device/serving.tar.xz for Python 3.12, x86_64
    python scripts/pack_device_carry.py --python 3.11    # for this machine's Python (to try it here)

On the device (docs/gpu.md), carrying .device: `bash scripts/device_bench.sh`, which unpacks it and
runs `bench serve` with `PYTHONPATH=services:<unpacked>/site` and `--tokenizer <unpacked>/tokenizer`.

Ray's wheel for CPython 3.12 is about 79 MB; most of it is what serving does not use: the Java
worker's jars (31 MB), the dashboard's built web client, and the libraries for training, tuning,
RL and data (`ray.rllib`, `ray.tune`, `ray.train`, `ray.data`, ...). Those are removed; the three
native binaries left (the GCS server, the raylet and `_raylet.so`, ~110 MB unpacked) lose their
symbol tables (`strip --strip-unneeded`), and xz packs the whole at about half what zip does. The
other packages are those `ray[serve]` and speccascade's serving path import that the device's
image lacks, and Qwen2.5's tokenizer (for random-weight models of real shapes there).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
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
    "smart-open", "wrapt", "watchfiles", "platformdirs", "mmh3",  # ray[serve]'s own list (not virtualenv: runtime
    # environments that install packages; not py-spy: the dashboard's profiler)
    "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-proto", "opentelemetry-exporter-prometheus",
    "opentelemetry-semantic-conventions", "importlib-metadata", "zipp",
    # The image has these, but maybe older: our gRPC stubs (and Ray's) check at import that the
    # protobuf runtime is at least the version they were generated with, so they travel at ours.
    "protobuf", "grpcio", "six",
]
# Parts of Ray that serving never loads (paths inside the installed package).
RAY_STRIP = (
    "ray/jars/",  # the Java worker
    "ray/dashboard/client/build/",  # the dashboard's built web client
    "ray/rllib/", "ray/tune/", "ray/train/", "ray/data/", "ray/air/examples/", "ray/workflow/",
    "ray/cpp/",  # the C++ API's headers and libraries
    "ray/serve/llm/",  # Ray Serve LLM (vLLM integration)
    "ray/llm/",
    "ray/tests/",
)


def pip_install(requirements: list[str], target: Path, python: str) -> None:
    """Install wheels built for `python` on x86_64 Linux into `target` (no dependencies resolved:
    the list is complete)."""
    version = python.replace(".", "")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:", "--no-compile",
               "--python-version", version, "--implementation", "cp", "--abi", f"cp{version}", "--abi", "abi3",
               "--abi", "none", "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
               "--platform", "manylinux_2_28_x86_64", "--platform", "any", "--target", str(target), *requirements]
    subprocess.run(command, check=True)


def pinned(name: str) -> str:
    """`name==version` as installed here (the versions the tests ran with), else the newest."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:
        return name


def strip_ray(site: Path) -> int:
    """Remove what serving never loads from the installed Ray and strip its native binaries;
    returns the bytes removed."""
    before = tree_bytes(site / "ray")
    for prefix in RAY_STRIP:
        shutil.rmtree(site / prefix, ignore_errors=True)
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts with this machine's interpreter path
    for path in (site / "ray").rglob("*"):
        if path.is_file() and path.read_bytes()[:4] == b"\x7fELF":
            subprocess.run(["strip", "--strip-unneeded", str(path)], check=True)
    return before - tree_bytes(site / "ray")


def tree_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def save_tokenizer(directory: Path) -> None:
    """The packaged drafter's tokenizer files (a few MiB), which a GPU machine without network cannot
    fetch: `bench serve --shapes ... --tokenizer /tmp/sc/tokenizer` builds its models with it."""
    from speccascade.models import DRAFTER_DEFAULT, resolve_model
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(resolve_model(DRAFTER_DEFAULT).path).save_pretrained(directory)


def main(argv: list[str] | None = None) -> int:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the device's Python (default 3.12)")
    parser.add_argument("--out", type=Path, default=REPO / ".device" / "serving.tar.xz")
    parser.add_argument("--budget-mib", type=float, default=50.0, help="fail if the carry is larger")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        site = root / "site"
        pip_install([f"ray=={ray.__version__}", *(pinned(name) for name in DEVICE_MISSING)], site, args.python)
        removed = strip_ray(site)
        print(f"ray {ray.__version__}: {removed / MIB:.1f} MiB removed, {tree_bytes(site / 'ray') / MIB:.1f} MiB left")
        save_tokenizer(root / "tokenizer")
        with tarfile.open(args.out, "w:xz", preset=9) as archive:
            archive.add(site, "site")
            archive.add(root / "tokenizer", "tokenizer")
    size = args.out.stat().st_size
    print(f"{args.out}: {size / MIB:.1f} MiB")
    if size > args.budget_mib * MIB:
        print(f"over the budget of {args.budget_mib:g} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
