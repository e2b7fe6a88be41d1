#!/usr/bin/env bash
# The main job on a fresh clone: set everything up, then show glassbox on SmolLM2-135M.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo_root/scripts/setup.sh"
exec "$repo_root/.venv/bin/python" -m glassbox.demo "$@"
