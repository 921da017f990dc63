#!/usr/bin/env bash
# Issue 7 table: LR-QAT vs full QAT vs RTN / GPTQ at W4 and W3 per output channel (symmetric)
# on smollm2-135m. Training: STEPS (default 50) steps of 4 x 256 tokens of austen-emma (seed 0;
# 51k tokens; estimated from CPU seconds per step on 2 idle cores: LR-QAT ~13 min of training,
# full QAT ~20 min, plus ~4 min of setup and evaluation per run), bf16
# matmuls, block checkpointing; LR-QAT r = 32, Q4.4 downcast (Q3.5 at W3), L^4 range init; full
# QAT trains the fp32 weights through the same fake quantizer at the same batch. For this short
# budget LR-QAT uses alpha = r (A B unscaled) and both use scale lr 1e-4 (see docs/LRQAT.md);
# the rest are the defaults (A, B lr 1e-3; full-QAT weights 5e-5; warm-up 10%, linear decay).
# GPTQ calibrates on 32 x 512 tokens of austen-emma. Evaluation on the first MAX_TOKENS (16384)
# tokens of austen-pp and brown, windows of 512, KLD to the base on austen-pp.
# Each training run checkpoints every 10 steps into $RUNS/<name>.ckpt and resumes from it;
# a result JSON that exists is kept (re-running resumes). Each JSON's "training" block records
# seconds and CPU seconds per step, the training phase's peak RSS and the training state sizes;
# the script ends with the LR-QAT vs full-QAT cost table.
# Usage: [STEPS=N] [MAX_TOKENS=N] [BITS="4 3"] [ROWS="rtn gptq lrqat fullqat"] \
#   [OUT=results/lrqat] [RUNS=runs] \
#   benchmarks/lrqat.sh [MODEL]
set -euo pipefail
cd "$(dirname "$0")/.."
LOWBIT=${LOWBIT:-.venv/bin/lowbit}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-results/lrqat}
RUNS=${RUNS:-runs}
mkdir -p "$OUT" "$RUNS"
M=${1:-smollm2-135m}
EVAL=(--ppl austen-pp brown --kld --max-tokens "${MAX_TOKENS:-16384}")
TRAIN=(--steps "${STEPS:-50}" --batch-size 4 --train-seqlen 256 --train-corpus austen-emma
  --train-seed 0 --checkpoint-every 10 --scale-lr 1e-4 --resume)
run() {  # name, then quantize flags
  local name=$1
  shift
  [ -f "$OUT/$M-$name.json" ] && return
  "$LOWBIT" quantize "$M" "$@" "${EVAL[@]}" --out "$RUNS/$M-$name" --json "$OUT/$M-$name.json"
}
for bits in ${BITS:-4 3}; do
  for row in ${ROWS:-rtn gptq lrqat fullqat}; do
    case $row in
      # RTN's weights do not depend on the calibration data (only its reported output error)
      rtn) run "rtn-w$bits-pc" --method rtn --bits "$bits" -g -1 --sym --nsamples 16 ;;
      gptq) run "gptq-w$bits-pc" --method gptq --bits "$bits" -g -1 --sym --nsamples 32 \
        --seqlen 512 --no-static-groups ;;  # as measured (the permutation stored)
      lrqat) run "lrqat-w$bits-pc" --method lrqat --bits "$bits" -g -1 --alpha 32 "${TRAIN[@]}" ;;
      fullqat) run "fullqat-w$bits-pc" --method lrqat --full-qat --bits "$bits" -g -1 \
        "${TRAIN[@]}" ;;
      *) echo "unknown row $row (rtn gptq lrqat fullqat)" >&2; exit 2 ;;
    esac
  done
done
"$PYTHON" benchmarks/table.py "$OUT/$M"-*.json
"$PYTHON" benchmarks/lrqat_cost.py "$OUT/$M"-*qat-*.json
