#!/usr/bin/env bash
# The whole test suite on a fresh clone: set everything up, lint, run pytest, then the vLLM tests in
# their own virtualenv (.venv-vllm, made by scripts/setup_vllm.sh; GLASSBOX_VLLM_TESTS=0 skips them,
# and so does giving pytest arguments, which runs just those). Exits non-zero if either run fails,
# and ends with one line adding up both runs.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
bash scripts/setup.sh
echo "[test] ruff check"
.venv/bin/ruff check src tests bench
echo "[test] pytest"
if [[ $# -gt 0 || "${GLASSBOX_VLLM_TESTS:-1}" == "0" ]]; then
    exec .venv/bin/python -m pytest -q "$@"
fi

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
status=0
.venv/bin/python -m pytest -q 2>&1 | tee "$logs/main.txt" || status=1

echo "[test] vLLM: setting up .venv-vllm, then pytest tests/vllm"
if bash scripts/setup_vllm.sh; then
    .venv-vllm/bin/python -m pytest -q tests/vllm 2>&1 | tee "$logs/vllm.txt" || status=1
else
    echo "[test] vLLM: setup failed" | tee "$logs/vllm.txt"
    status=1
fi

# pytest's closing line of each run ("12 failed, 1200 passed, 3 skipped in 300.0s"), added up.
.venv/bin/python - "$logs/main.txt" "$logs/vllm.txt" <<'EOF'
import re
import sys

totals = {"passed": 0, "failed": 0, "skipped": 0}
for path in sys.argv[1:]:
    lines = [line for line in open(path, errors="replace") if re.search(r"\d+ (passed|failed|error)", line)]
    if not lines:
        totals["failed"] += 1  # a run that never reached its summary counts as a failure
        continue
    for count, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", lines[-1]):
        totals["failed" if word.startswith("error") else word] += int(count)
print(f"total: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
EOF
exit "$status"
