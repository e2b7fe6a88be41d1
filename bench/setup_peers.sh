#!/usr/bin/env bash
# Create /work/main/.venv-peers: a side virtualenv holding nnsight 0.8.1 and TransformerLens 4.3.0,
# the peers that bench/overhead.py, bench/smollm2.py and bench/extract.py compare glassbox with.
#
# torch is installed FIRST and pinned (the CPU wheel lies on local disk; an unpinned torch
# would pull a multi-GB CUDA build), then nnsight and the transformers it needs, with a
# constraint that stops pip from replacing torch. Safe to run again: it only adds what is missing.
#
# One venv for both peers, not a second .venv-peers-tl: nnsight 0.8.1 leaves transformers
# unpinned and transformer-lens 4.3.0 asks for transformers>=5.9 and torch>=2.6, which the
# nnsight step already satisfies (it got transformers 5.24.0 when this was written), so
# transformer-lens is installed with BOTH torch and the transformers already there held by the
# constraint: nnsight keeps exactly the set it was installed (and benchmarked) with. Should a
# later transformer-lens need another transformers, pip fails here on the constraint rather
# than silently moving nnsight's transformers; that is the time to split the venv.
#
#   bash bench/setup_peers.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ROOT}/.venv-peers"
TORCH_VERSION="2.13.0"
NNSIGHT_VERSION="0.8.1"
TRANSFORMER_LENS_VERSION="4.3.0"
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

constraints="$(mktemp)"
trap 'rm -f "${constraints}"' EXIT

if [[ "$(installed_version nnsight)" != "${NNSIGHT_VERSION}" ]]; then
    echo "setup_peers: installing nnsight==${NNSIGHT_VERSION} and transformers (torch held)" >&2
    echo "torch==$(installed_version torch)" >"${constraints}"
    "${PIP[@]}" install -c "${constraints}" "nnsight==${NNSIGHT_VERSION}" transformers
fi

if [[ "$(installed_version transformer-lens)" != "${TRANSFORMER_LENS_VERSION}" ]]; then
    echo "setup_peers: installing transformer-lens==${TRANSFORMER_LENS_VERSION}" \
         "(torch and transformers held)" >&2
    {
        echo "torch==$(installed_version torch)"
        echo "transformers==$(installed_version transformers)"
    } >"${constraints}"
    "${PIP[@]}" install -c "${constraints}" "transformer-lens==${TRANSFORMER_LENS_VERSION}"
fi

"${VENV}/bin/python" - <<'PYEOF'
from importlib.metadata import version

import nnsight
import torch
import transformer_lens  # noqa: F401  (imported to prove it loads, not just that it installed)
import transformers

print(f"setup_peers: ready: torch {torch.__version__}, nnsight {nnsight.__version__}, "
      f"transformer-lens {version('transformer-lens')}, transformers {transformers.__version__}")
PYEOF
