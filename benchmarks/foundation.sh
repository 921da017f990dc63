#!/usr/bin/env bash
# Issue 2 table: base vs RTN vs GPTQ at W4 g128 and W3 g128 (symmetric) on the bundled models.
# Calibration 32 x 512 tokens of austen-emma (seed 0); evaluation on the first MAX_TOKENS
# (default 16384) tokens of austen-pp and brown, windows of 512; KLD to the base on austen-pp.
# A result JSON that exists is kept (re-running resumes). Results in results/foundation/*.json.
# Usage: [MAX_TOKENS=N] [BITS="4 3"] benchmarks/foundation.sh [MODEL ...]
set -euo pipefail
cd "$(dirname "$0")/.."
LOWBIT=${LOWBIT:-.venv/bin/lowbit}
OUT=results/foundation
mkdir -p "$OUT" runs
EVAL=(--ppl austen-pp brown --max-tokens "${MAX_TOKENS:-16384}")
for m in ${*:-smollm2-135m gemma3-270m}; do
  [ -f "$OUT/$m-base.json" ] || "$LOWBIT" eval "$m" "${EVAL[@]}" --json "$OUT/$m-base.json"
  for bits in ${BITS:-4 3}; do
    for method in rtn gptq; do
      [ -f "$OUT/$m-$method-w$bits-g128.json" ] && continue
      # measured before static groups became GPTQ's default: groups follow act-order
      extra=(); [ "$method" = gptq ] && extra=(--no-static-groups)
      "$LOWBIT" quantize "$m" --method "$method" --bits "$bits" --group-size 128 --sym \
        --ragged-groups --nsamples 32 --seqlen 512 --out "runs/$m-$method-w$bits-g128" "${extra[@]}" \
        "${EVAL[@]}" --kld --json "$OUT/$m-$method-w$bits-g128.json"
    done
  done
done
