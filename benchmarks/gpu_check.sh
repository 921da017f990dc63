#!/usr/bin/env bash
# Issue 20's GPU checks as one short script for a lent CUDA machine (about 15 minutes of device
# time in all, 10 minutes per command): the `gpu` tests (every method on tiny random models on
# cuda and on cpu, compared) and the scale benchmark at the full 128 x 2048 calibration tokens
# (Llama-3-8B, then Llama-3-70B block; GPTQ, SpQR, QLLM) on the GPU.
# Logs and JSON go to $OUT when set (the device tool's folder that comes back), else
# results/scale; the scale JSON starts from the committed CPU rows, so it holds both.
# Each step has its own time limit so that a slow one cannot take the others' time; the JSON is
# written after every (model, method) run, so a cut-short step keeps what finished.
# Usage: [PYTHON=python3] [OUT=dir] benchmarks/gpu_check.sh   (run from anywhere; not in CI)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-results/scale}
mkdir -p "$DEST"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ "$DEST/scale_blocks.json" -ef results/scale/scale_blocks.json ] ||
  cp results/scale/scale_blocks.json "$DEST/scale_blocks.json" 2>/dev/null || true
{ nvidia-smi; "$PY" -c 'import torch, transformers; print(torch.__version__,
  transformers.__version__, torch.cuda.get_device_name())'; } 2>&1 | tee "$DEST/gpu_env.log"
timeout 120 "$PY" -m pytest -m gpu tests/test_device.py -q -p no:cacheprovider 2>&1 |
  tee "$DEST/gpu_tests.log"
for model in 8b 70b; do
  timeout "$([ "$model" = 8b ] && echo 150 || echo 240)" "$PY" benchmarks/scale_blocks.py \
    --model "$model" --device cuda \
    --nsamples 128 --seqlen 2048 --json "$DEST/scale_blocks.json" 2>&1 |
    tee "$DEST/scale_gpu_$model.log"
done
"$PY" benchmarks/scale_blocks.py --json "$DEST/scale_blocks.json" --show 2>&1 |
  tee "$DEST/scale_table.md"
