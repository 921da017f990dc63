#!/usr/bin/env bash
# Issue 5 table: the ZeroQuant-FP paper comparison (W16A16, W8A8 INT-INT / FP-FP, W4A8 INT-INT /
# INT-FP / FP-FP, each with and without LoRC rank 8, FP-FP with M1 and M2 scales). Protocol as
# benchmarks/foundation.sh: calibration 32 x 512 tokens of austen-emma (seed 0); evaluation on the
# first MAX_TOKENS tokens of austen-pp and brown, KLD on austen-pp. Group size 64 divides every
# width of both bundled models. Activations are quantized in the evaluation (simulated on CPU).
# Existing results are kept (re-running resumes). Results in results/zqfp/<model>/*.json.
# ROWS=w8a16-int (INT8 weights, activations unquantized; not in the default rows) separates the
# weight error from the activation error at W8A8.
# Usage: [MAX_TOKENS=N] [ROWS="w4a8-int-int ..."] [LORC_RANKS="0 8"] benchmarks/zqfp.sh [MODEL ...]
set -euo pipefail
cd "$(dirname "$0")/.."
LOWBIT=${LOWBIT:-.venv/bin/lowbit}
EVAL=(--ppl austen-pp brown --max-tokens "${MAX_TOKENS:-16384}")
declare -A ROW=(
  [w8a8-int-int]="--weight-format int8 --act-format int8"
  [w8a8-fp-fp]="--weight-format fp8_e4m3 --act-format fp8_e4m3"
  [w8a16-int]="--weight-format int8 --act-format none"
  [w4a8-int-int]="--weight-format int4 --act-format int8"
  [w4a8-int-fp]="--weight-format int4 --act-format fp8_e4m3"
  [w4a8-fp-fp]="--weight-format fp4_e2m1 --act-format fp8_e4m3"
  [w4a8-fp-fp-m1]="--weight-format fp4_e2m1 --act-format fp8_e4m3 --scale-constraint m1"
  [w4a8-fp-fp-m2]="--weight-format fp4_e2m1 --act-format fp8_e4m3 --scale-constraint m2"
)
ORDER=${ROWS:-w4a8-int-int w4a8-int-fp w4a8-fp-fp w4a8-fp-fp-m1 w4a8-fp-fp-m2 w8a8-int-int w8a8-fp-fp}
for m in ${*:-smollm2-135m gemma3-270m}; do
  out=results/zqfp/$m
  mkdir -p "$out" "runs/zqfp/$m"
  [ -f "$out/w16a16.json" ] || "$LOWBIT" eval "$m" "${EVAL[@]}" --json "$out/w16a16.json"
  for rank in ${LORC_RANKS:-0 8}; do
    for row in $ORDER; do
      name=$row
      [ "$rank" = 0 ] || name=$row-lorc$rank
      [ -f "$out/$name.json" ] && continue
      # shellcheck disable=SC2086
      "$LOWBIT" quantize "$m" --method zqfp ${ROW[$row]} --group-size 64 --lorc-rank "$rank" \
        --nsamples 32 --seqlen 512 "${EVAL[@]}" --kld --out "runs/zqfp/$m/$name" \
        --json "$out/$name.json"
    done
  done
done
