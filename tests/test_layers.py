"""The package's layers, as ARCHITECTURE.md draws them: imports point down, never up, and no two
modules import each other. Read from the source (every import, those inside functions too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "services" / "speccascade"
GENERATED = PACKAGE / "api" / "v1"

# Lower layers first. A package may import its own modules and those of packages in lower layers.
LAYERS: list[set[str]] = [
    {"options", "models", "api", "status_board"},  # leaves: request choices, model pairs, the gRPC client, the status board
    {"config"},  # typed configuration (options, the packaged models' names)
    {"cascade"},  # the math
    {"engine"},  # the decoding loop and model backends
    {"tenancy"},  # keys, quotas, fair share, applied to engine requests
    {"autoscale"},  # the deferral-aware policy, its settings and signals
    {"serving"},  # the Ray Serve core: router core, tiers, batching, tier clients
    {"frontends"},  # gRPC and OpenAI adapters over the router core
    {"app", "k8s"},  # the application builder and local launcher; the Kubernetes tooling
    {"commands"},  # the command line
    {"bench"},  # the benchmarks (they take the commands' shared arguments)
    {"cli", "__init__"},  # the command line's entry point; the in-process API
]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}

# Packages that run inside the model-free parts of the system, or that must stay importable
# without the serving stack: what each may never import, even lazily.
FORBIDDEN = {
    "options": {"torch", "transformers", "ray", "grpc", "fastapi", "pydantic"},
    "config": {"torch", "transformers", "ray", "grpc", "fastapi"},
    "cascade": {"transformers", "ray", "grpc", "fastapi", "pydantic"},
    "engine": {"ray", "grpc", "grpc_health", "fastapi", "starlette"},
    "models": {"ray", "grpc", "fastapi"},
    "tenancy": {"torch", "transformers", "ray", "grpc", "fastapi"},
    "autoscale": {"torch", "transformers", "grpc", "fastapi"},
}


def module_name(path: Path) -> tuple[str, ...]:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports_of(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Dotted names `path` imports (relative ones resolved)."""
    tree = ast.parse(path.read_text())
    here = module_name(path)
    package = here if path.name == "__init__.py" else here[:-1]
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ((node.module,) if node.module else ()))
            else:
                module = node.module or ""
            names.add(module)
            if top_level_only:  # `from pkg import submodule` depends on the submodule
                names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def sources() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if GENERATED not in p.parents]


def package_of(path: Path) -> str:
    parts = module_name(path)
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer():
    assert {package_of(path) for path in sources()} <= set(RANK)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    own = package_of(path)
    upward, forbidden = [], []
    for name in imports_of(path):
        parts = name.split(".")
        if parts[0] == "speccascade" and len(parts) > 1:
            target = parts[1]
            if target != own and RANK[target] >= RANK[own]:
                upward.append(f"{name} (layer {RANK[target]} >= {RANK[own]})")
        elif parts[0] in FORBIDDEN.get(own, ()):
            forbidden.append(name)
    assert not upward, f"{path.relative_to(PACKAGE)} ({own}, layer {RANK[own]}) imports upward: {upward}"
    assert not forbidden, f"{path.relative_to(PACKAGE)} ({own}) must not import {forbidden}"


def test_no_module_imports_another_that_imports_it_back():
    """No cycles among the modules' top-level imports."""
    modules = {".".join(module_name(path)): path for path in sources()}
    graph = {name: {target for target in imports_of(path, top_level_only=True)
                    if target in modules and target != name and not name.startswith(target + ".")}
             for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, trail: list[str]) -> list[str] | None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                return trail + [name, target]
            if target not in state and (cycle := visit(target, trail + [name])):
                return cycle
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]):])


@pytest.mark.parametrize("module", ["speccascade.config", "speccascade.options", "speccascade.cli",
                                    "speccascade.autoscale.policy"])
def test_light_modules_load_no_model_library(module):
    """Reading a configuration, the command line's start and the autoscaling policy (which runs
    in Serve's controller) never load torch."""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
