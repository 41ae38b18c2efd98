"""The container images (docker/<flavour>.Dockerfile), checked without a Docker daemon: the base
image is Ray's official image of the chart's rayVersion, torch is the package's own pin, `make
image` tags what the chart runs by default, and the install step really installs: it is run here,
as the image would run it, in a fresh virtual environment (slow: a few minutes)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from speccascade.serving.heap import ALLOCATOR_PACKAGES

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "speccascade"
FLAVOURS = {"cpu": "cpu", "cuda": "cu128"}  # flavour -> platform tag of the Ray image
# What an image build may differ in between flavours: the base image and where torch comes from.
FLAVOUR_ARGS = ("TORCH_INDEX_URL",)


def dockerfile(flavour: str) -> DockerfileParser:
    return DockerfileParser(str(REPO / "docker" / f"{flavour}.Dockerfile"))


def instructions(parsed: DockerfileParser) -> list[tuple[str, str]]:
    return [(i["instruction"], i["value"]) for i in parsed.structure if i["instruction"] != "COMMENT"]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def torch_pin() -> str:
    """The exact torch of the install path (`make install`), which the images install too."""
    (version,) = re.findall(r"pip install --quiet torch==(\S+)", (REPO / "Makefile").read_text())
    return version


def test_the_images_torch_is_the_install_paths_and_fits_the_package():
    from packaging.requirements import Requirement

    (spec,) = [Requirement(d) for d in pyproject()["project"]["dependencies"] if re.match(r"torch\b", d)]
    for flavour in FLAVOURS:
        assert dockerfile(flavour).args["TORCH_VERSION"] == torch_pin()
    assert spec.specifier.contains(torch_pin())


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_the_base_image_is_rays_official_image_of_the_charts_version(flavour):
    parsed = dockerfile(flavour)
    ray_version = yaml.safe_load((CHART / "values.yaml").read_text())["rayVersion"]
    python = "py{}{}".format(*sys.version_info[:2])  # the rehearsal below runs this Python: the image's
    assert parsed.baseimage == f"rayproject/ray:{ray_version}-{python}-{FLAVOURS[flavour]}"


def test_the_flavours_differ_only_in_base_image_and_torch_index():
    cpu, cuda = dockerfile("cpu"), dockerfile("cuda")
    assert cpu.args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert cuda.args["TORCH_INDEX_URL"] == ""  # PyPI's torch for Linux: the CUDA build

    def normalised(parsed):
        return [(op, value) for op, value in instructions(parsed)
                if op != "FROM" and not (op == "ARG" and value.split("=")[0] in FLAVOUR_ARGS)]

    assert normalised(cpu) == normalised(cuda)


def test_make_image_tags_what_the_chart_runs_by_default():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    version = pyproject()["project"]["version"]
    assert chart["appVersion"] == version  # the chart's default tag is <appVersion>-<flavour>
    assert values["image"]["repository"] == "speccascade" and values["image"]["tag"] == ""
    dry_run = subprocess.run(["make", "-n", "image", "REGISTRY=registry.example.com/ml"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    builds = re.findall(r"docker build -f docker/(\w+)\.Dockerfile --build-arg RAY_VERSION=(\S+) -t (\S+) \.", dry_run)
    assert builds == [(flavour, values["rayVersion"], f"registry.example.com/ml/speccascade:{version}-{flavour}")
                      for flavour in ("cpu", "cuda")]
    assert values["image"]["flavour"] in FLAVOURS


def copy_and_run(parsed: DockerfileParser, *, context: Path, workdir: Path, venv: Path, build_args: dict) -> None:
    """Run the Dockerfile's steps after FROM as `docker build` would inside the image: ARGs as
    environment variables, COPY from the build context to WORKDIR-relative destinations, RUN in
    a shell whose pip and python are the fresh virtual environment's. Steps run as root install
    system packages into the image, not into this machine: they are left out
    (test_the_images_install_the_allocators_a_tier_may_ask_for checks them)."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    args = {**parsed.args, **build_args}
    started, user = False, None
    for op, value in instructions(parsed):
        if op == "FROM":
            started = True
            continue
        if not started or op == "ARG":
            continue
        if op == "USER":
            user = value
            continue
        if user == "root":
            continue
        if op == "WORKDIR":
            assert value.startswith("/"), value  # the image's home; here, the rehearsal's directory
        elif op == "COPY":
            *sources, destination = [v for v in value.split() if not v.startswith("--")]
            assert not destination.startswith("/"), f"COPY {value}: keep destinations relative to WORKDIR"
            target = workdir / destination
            target.mkdir(parents=True, exist_ok=True)
            for source in sources:
                matches = sorted(context.glob(source))
                assert matches, f"COPY {source}: nothing in the build context"
                for match in matches:
                    shutil.copy(match, target / match.name)
        elif op == "RUN":
            subprocess.run(["sh", "-c", value], cwd=workdir, env={**env, **args}, check=True)
        else:
            pytest.fail(f"the rehearsal does not know {op} {value}; teach it before using it in an image")


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_the_images_install_the_allocators_a_tier_may_ask_for(flavour):
    steps = [(op, value) for op, value in instructions(dockerfile(flavour)) if op in ("USER", "RUN")]
    users = [value for op, value in steps if op == "USER"]
    assert users == ["root", "ray"]  # root for the system package only; Ray's user runs everything else
    as_root = [value for op, value in steps[steps.index(("USER", "root")):steps.index(("USER", "ray"))] if op == "RUN"]
    # Debian/Ubuntu's packages of the libraries a tier preloads for each allocator it may ask for.
    packages = " ".join(ALLOCATOR_PACKAGES.values())
    assert any(f"apt-get install -y --no-install-recommends {packages}" in step for step in as_root)


@pytest.mark.slow
def test_the_install_step_installs_the_package_and_its_cli(tmp_path):
    """Builds the wheel, then runs the CUDA image's steps as they are: on this machine the spec
    `torch==<pin>` from the default index resolves to a local CPU wheel, where a real build gets
    PyPI's CUDA torch. The CPU image's steps are the same with TORCH_INDEX_URL pointing at
    PyTorch's CPU index (test_the_flavours_differ_only_in_base_image_and_torch_index), so running
    them with that one build argument emptied, as `--build-arg TORCH_INDEX_URL=` would, is this
    very run."""
    source = tmp_path / "source"  # a clean copy: no stale build/ directory can leak into the wheel
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "services", source / "services", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    context = tmp_path / "context"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(context / "dist"),
                    str(source)], check=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    venv, workdir = tmp_path / "image-python", tmp_path / "home-ray"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    workdir.mkdir()

    copy_and_run(dockerfile("cuda"), context=context, workdir=workdir, venv=venv, build_args={})

    assert list(workdir.iterdir()) == []  # the wheel was removed after installing
    python = venv / "bin" / "python"
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run(
        [str(python), "-c", "import speccascade, torch, ray, speccascade.app as app; "
                            "print(speccascade.__file__); print(torch.__version__); print(ray.__version__)"],
        cwd=tmp_path, env=clean_env, capture_output=True, text=True, check=True).stdout.split()
    assert probe[0].startswith(str(venv))  # the installed package, not this checkout
    assert probe[1].split("+")[0] == torch_pin()
    assert probe[2] == yaml.safe_load((CHART / "values.yaml").read_text())["rayVersion"]
    cli = subprocess.run([str(venv / "bin" / "speccascade"), "health", "--help"], cwd=tmp_path, env=clean_env,
                         capture_output=True, text=True, check=True).stdout
    assert "--wait" in cli
