#!/usr/bin/env bash
# Create /work/main/.venv-peers: a side virtualenv holding nnsight 0.8.1 for bench/overhead.py.
#
# torch is installed FIRST and pinned (the CPU wheel lies on local disk; an unpinned torch
# would pull a multi-GB CUDA build), then nnsight and the transformers it needs, with a
# constraint that stops pip from replacing torch. Safe to run again: it only adds what is missing.
#
#   bash bench/setup_peers.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ROOT}/.venv-peers"
TORCH_VERSION="2.13.0"
NNSIGHT_VERSION="0.8.1"
PY="${PYTHON:-python3}"

if [[ ! -x "${VENV}/bin/python" ]]; then
    echo "setup_peers: creating ${VENV}" >&2
    "${PY}" -m venv "${VENV}"
fi
PIP=("${VENV}/bin/python" -m pip --disable-pip-version-check)

installed_version() {
    "${VENV}/bin/python" - "$1" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    print("")
PYEOF
}

torch_now="$(installed_version torch)"
if [[ "${torch_now%%+*}" != "${TORCH_VERSION}" ]]; then
    echo "setup_peers: installing torch==${TORCH_VERSION} (CPU wheel)" >&2
    "${PIP[@]}" install "torch==${TORCH_VERSION}"
fi

if [[ "$(installed_version nnsight)" != "${NNSIGHT_VERSION}" ]]; then
    echo "setup_peers: installing nnsight==${NNSIGHT_VERSION} and transformers (torch held)" >&2
    constraints="$(mktemp)"
    trap 'rm -f "${constraints}"' EXIT
    echo "torch==$(installed_version torch)" >"${constraints}"
    "${PIP[@]}" install -c "${constraints}" "nnsight==${NNSIGHT_VERSION}" transformers
fi

"${VENV}/bin/python" - <<'PYEOF'
import nnsight
import torch
import transformers

print(f"setup_peers: ready: torch {torch.__version__}, nnsight {nnsight.__version__}, "
      f"transformers {transformers.__version__}")
PYEOF
