#!/usr/bin/env bash
# Install guidellm (the vLLM ecosystem's load tool, which a test runs against the served OpenAI API)
# into its own virtual environment, .tools/guidellm/, so its dependencies never touch the project's.
# torch comes first with exactly the spec the project installs (the local CPU wheel here; guidellm
# would otherwise pull the CUDA build). Idempotent: does nothing when the pinned version runs.
set -euo pipefail

VERSION="0.8.1"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REPO_ROOT}/.tools/guidellm"

if [[ -x "${VENV}/bin/guidellm" ]] && "${VENV}/bin/guidellm" --version 2>/dev/null | grep -q "${VERSION}"; then
    echo "guidellm already installed: $("${VENV}/bin/guidellm" --version) (${VENV}/bin/guidellm)"
    exit 0
fi

python3 -m venv "${VENV}"
"${VENV}/bin/pip" install --quiet --upgrade pip
"${VENV}/bin/pip" install --quiet torch==2.13.0
"${VENV}/bin/pip" install --quiet "guidellm==${VERSION}"
echo "installed $("${VENV}/bin/guidellm" --version) into ${VENV}"
