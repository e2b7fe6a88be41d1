#!/usr/bin/env bash
# nnsight's own hub-free tests, run against glassbox through a plain name map.
#
#   bash bench/nnsight_suite.sh [--keep DIR] [--version V] [--min-pass N] [-- PYTEST_ARGS...]
#
# Fetches nnsight's sdist (default 0.8.1) with pip into a temporary folder, unpacks its
# tests/, maps the name `nnsight` to `glassbox` in conftest.py and the five test files that
# need no Hugging Face hub download (test_backward, test_interleaving, test_multiple_wrappers,
# test_saving, test_tracing; no per-test patches), runs pytest on them with the project's
# Python against this checkout's src/, and prints the counts and every failure by name with
# its exception's first line (bench/_nnsight_suite.py). Nothing of nnsight's is copied into
# the repository.
#   --keep DIR     unpack into DIR and keep it (the mapped tests, pytest.log, results.xml)
#   --version V    another nnsight release (the five files must exist in it)
#   --min-pass N   exit 1 when fewer than N pass (default 100)
#   PYTHON=...     the interpreter (default .venv/bin/python of this checkout)
# Exit status: 0 when at least --min-pass tests passed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
VERSION="0.8.1"
KEEP=""
MIN_PASS=100
PYTEST_ARGS=()

while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --min-pass) MIN_PASS="$2"; shift 2 ;;
    --) shift; PYTEST_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -n "$KEEP" ]; then
  mkdir -p "$KEEP"
  WORK="$(cd "$KEEP" && pwd)"
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/nnsight_suite.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
fi

echo "fetching nnsight==$VERSION's sdist into $WORK/download"
# the sdist, not the wheel: only the sdist ships tests/
"$PY" -m pip download --quiet --no-deps --no-binary :all: "nnsight==$VERSION" -d "$WORK/download"
SDIST="$(find "$WORK/download" -name "nnsight-$VERSION.tar.gz" -print -quit)"
if [ -z "$SDIST" ]; then
  echo "pip fetched no nnsight-$VERSION.tar.gz (the wheel has no tests/)" >&2
  exit 1
fi

# nnsight's own dependencies that its tests import and glassbox does not need (cloudpickle:
# TestOverloadedMount pickles the Envoy class), installed into the work folder only
DEPS=""
if ! "$PY" -c "import cloudpickle" 2>/dev/null; then
  "$PY" -m pip install --quiet --target "$WORK/deps" cloudpickle
  DEPS=":$WORK/deps"
fi

# this checkout's glassbox, whatever the interpreter has installed
export PYTHONPATH="$ROOT/src$DEPS${PYTHONPATH:+:$PYTHONPATH}"
# not exec: the EXIT trap removes the temporary folder afterwards
"$PY" "$ROOT/bench/_nnsight_suite.py" "$SDIST" "$WORK" --min-pass "$MIN_PASS" ${KEEP:+--kept} ${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"}
