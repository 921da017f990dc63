#!/usr/bin/env bash
# Creates the llm-compressor venv used by benchmarks/llmcompressor/vs_llmcompressor.py.
# llm-compressor is a peer tool for comparison only, never a lowbit dependency.
# Idempotent: a venv that already imports llmcompressor 0.14.0.1 is left as it is.
# Usage: bash benchmarks/llmcompressor/setup.sh   (venv: $LLMCOMPRESSOR_VENV, default /work/venvs/llmcompressor)
set -euo pipefail
VENV="${LLMCOMPRESSOR_VENV:-/work/venvs/llmcompressor}"
PYTHON="${PYTHON:-python3.11}"
VERSION="0.14.0.1"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c \
    "import importlib.metadata as m, sys; sys.exit(m.version('llmcompressor') != '$VERSION')" 2>/dev/null; then
    echo "llm-compressor $VERSION already in $VENV"
    exit 0
fi
mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || nice -n 10 "$PYTHON" -m venv "$VENV"
PIP="nice -n 10 $VENV/bin/python -m pip install --quiet"
# torch first, pinned: an unpinned torch resolves to a CUDA build (GBs of wheels).
$PIP "torch==2.13.0"
$PIP "llmcompressor==$VERSION"
"$VENV/bin/python" -c "import llmcompressor, torch; print('llm-compressor', llmcompressor.__version__, 'torch', torch.__version__)"
