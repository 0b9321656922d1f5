#!/usr/bin/env bash
# Create .venv and install l2m with its test extras. Idempotent: does nothing when
# .venv is newer than pyproject.toml. On a machine without an NVIDIA GPU, the CPU build
# of PyTorch is installed first so that pip does not pull the multi-GB CUDA build.
#   PYTHON=python3.11   interpreter for the venv (default: python3)
#   VENV=.venv          where the venv goes
#   TORCH_SPEC=...      torch requirement to install first on CPU machines
#   TORCH_INDEX_URL=... package index holding a CPU build of that torch (optional)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.l2m-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1 && ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: no NVIDIA GPU found, installing the CPU build of PyTorch"
  "$VENV/bin/pip" install -q "${TORCH_SPEC:-torch==2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
"$VENV/bin/pip" install -q -e ".[dev]"
# Mamba's compiled CPU loops (l2m.models.compiled): built now so that no run waits for it
"$VENV/bin/python" -c "from l2m.models.compiled import build; build()" \
  || echo "setup: no compiled CPU loops (Mamba on a CPU takes the pure-PyTorch path): is g++ installed?"
touch "$stamp"
echo "setup: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
