#!/usr/bin/env bash
# Install lm-evaluation-harness (the evaluation tool whose `local-completions` model a test runs
# against the served OpenAI API) into its own virtual environment, .tools/lm-eval/, so its
# dependencies never touch the project's. torch comes first with exactly the spec the project
# installs (the local CPU wheel here; lm-eval would otherwise pull the CUDA build); transformers
# gives it the served pair's tokenizer. Idempotent: does nothing when the pinned version runs.
set -euo pipefail

VERSION="0.4.13"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REPO_ROOT}/.tools/lm-eval"

installed() {
    "${VENV}/bin/python" -c "import lm_eval, transformers, aiohttp, tenacity; from importlib.metadata import version; \
assert version('lm_eval') == '${VERSION}'" 2>/dev/null
}

if [[ -x "${VENV}/bin/lm-eval" ]] && installed; then
    echo "lm-eval already installed: ${VERSION} (${VENV}/bin/lm-eval)"
    exit 0
fi

python3 -m venv "${VENV}"
"${VENV}/bin/pip" install --quiet --upgrade pip
"${VENV}/bin/pip" install --quiet torch==2.13.0
"${VENV}/bin/pip" install --quiet "lm_eval[api]==${VERSION}" transformers
installed
echo "installed lm-eval ${VERSION} into ${VENV}"
