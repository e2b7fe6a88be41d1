#!/usr/bin/env bash
# The whole test suite on a fresh clone: set everything up, lint, then run pytest.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
bash scripts/setup.sh
echo "[test] ruff check"
.venv/bin/ruff check src tests bench
echo "[test] pytest"
exec .venv/bin/python -m pytest -q "$@"
