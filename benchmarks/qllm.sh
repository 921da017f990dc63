#!/usr/bin/env bash
# Issue 6 table: QLLM against RTN W/A and SmoothQuant at W4A4, W4A8, W6A6 (weights per-channel
# asymmetric min-max, activations per-token dynamic asymmetric, simulated on CPU), plus the
# ablation (reassembly only, error correction only). Calibration: NSAMPLES x 512 tokens of
# austen-emma (seed 0); evaluation on the first MAX_TOKENS tokens of austen-pp and brown, KLD on
# austen-pp. Error correction: EPOCHS passes over the calibration windows, one window per step,
# per group of 4 blocks. Existing results are kept (re-running resumes).
# Results in results/qllm/<model>/*.json.
# Usage: [MAX_TOKENS=N] [NSAMPLES=N] [EPOCHS=N] [BITS="w4a4 ..."] [ROWS="rtn ..."]
#        benchmarks/qllm.sh [MODEL ...]
set -euo pipefail
cd "$(dirname "$0")/.."
LOWBIT=${LOWBIT:-.venv/bin/lowbit}
EVAL=(--ppl austen-pp brown --max-tokens "${MAX_TOKENS:-4096}")
CALIB=(--nsamples "${NSAMPLES:-16}" --seqlen 512)
declare -A ROW=(
  [rtn]="--method qllm --no-reassembly --no-correction"
  [smoothquant]="--method smoothquant"
  [qllm-noec]="--method qllm --no-correction"
  [qllm-ec-only]="--method qllm --no-reassembly --epochs ${EPOCHS:-2}"
  [qllm]="--method qllm --epochs ${EPOCHS:-2}"
)
declare -A WA=([w4a4]="--bits 4 --abits 4" [w4a8]="--bits 4 --abits 8" [w6a6]="--bits 6 --abits 6")
for m in ${*:-smollm2-135m gemma3-270m}; do
  out=results/qllm/$m
  mkdir -p "$out" "runs/qllm/$m"
  [ -f "$out/w16a16.json" ] || "$LOWBIT" eval "$m" "${EVAL[@]}" --json "$out/w16a16.json"
  for bits in ${BITS:-w4a4 w4a8 w6a6}; do
    for row in ${ROWS:-rtn smoothquant qllm-noec qllm}; do
      name=$bits-$row
      [ -f "$out/$name.json" ] && continue
      # shellcheck disable=SC2086
      "$LOWBIT" quantize "$m" ${ROW[$row]} ${WA[$bits]} "${CALIB[@]}" "${EVAL[@]}" --kld \
        --out "runs/qllm/$m/$name" --json "$out/$name.json"
    done
  done
done
