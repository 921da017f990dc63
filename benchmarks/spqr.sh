#!/usr/bin/env bash
# Issue 4 table: SpQR at ~3.7 and ~4.7 bits against RTN/GPTQ near the same bits, same protocol
# as benchmarks/foundation.sh (calibration 32 x 512 tokens of austen-emma, seed 0; evaluation
# on the first MAX_TOKENS tokens of austen-pp and brown, KLD on austen-pp). Existing results are
# kept (re-running resumes). Results in results/spqr/*.json; base rows in results/foundation.
# Usage: [MAX_TOKENS=N] [ONLY="run-name ..."] benchmarks/spqr.sh [MODEL ...]
set -euo pipefail
cd "$(dirname "$0")/.."
LOWBIT=${LOWBIT:-.venv/bin/lowbit}
OUT=results/spqr
mkdir -p "$OUT" runs
COMMON=(--nsamples 32 --seqlen 512 --ppl austen-pp brown --max-tokens "${MAX_TOKENS:-16384}" --kld)
run() {  # name, then quantize flags
  local m=$1 name=$2
  shift 2
  [ -f "$OUT/$m-$name.json" ] && return
  [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
  "$LOWBIT" quantize "$m" "$@" "${COMMON[@]}" --out "runs/$m-$name" --json "$OUT/$m-$name.json"
}
for m in ${*:-smollm2-135m gemma3-270m}; do
  # ~3.7 and ~4.7 bits: SpQR 3-/4-bit 16x16 (tau 1.0 at 3 bits, percdamp 0.01, see docs/SPQR.md)
  run "$m" spqr-w3-t1-d001 --method spqr --bits 3 --outlier-threshold 1.0 --percdamp 0.01
  run "$m" spqr-w4-d001 --method spqr --bits 4 --percdamp 0.01
  # RTN/GPTQ symmetric g32 near the same bits (3.5 / 4.5); W3/W4 g128 rows are in foundation
  # (GPTQ measured with groups following act-order, its default until issue 21)
  run "$m" gptq-w3-g32 --method gptq --bits 3 -g 32 --sym --no-static-groups
  run "$m" rtn-w3-g32 --method rtn --bits 3 -g 32 --sym
  run "$m" gptq-w4-g32 --method gptq --bits 4 -g 32 --sym --no-static-groups
  run "$m" rtn-w4-g32 --method rtn --bits 4 -g 32 --sym
  # 3-bit codes with more outliers, still under 4 bits
  run "$m" spqr-w3-t045-d001 --method spqr --bits 3 --outlier-threshold 0.45 --percdamp 0.01
  # the defaults of docs/METHODS.md (tau 0.2, percdamp 1.0)
  run "$m" spqr-w3 --method spqr --bits 3
  run "$m" spqr-w4 --method spqr --bits 4
done
