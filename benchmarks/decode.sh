#!/usr/bin/env bash
# Issue 11 speed table: batch-1 decode and prefill tokens/s of quantized models against their
# base model in fp32 and bf16 (`lowbit bench decode`, method in docs/SPEED.md), on an idle CPU.
# Runs W4 g128 RTN (symmetric, ragged last group on SmolLM2's 576-wide layers: the same DIR as
# benchmarks/foundation.sh, made here if absent) and the SpQR DIRs of benchmarks/spqr.sh named in
# SPQR (default: the 3-bit and 4-bit table points) when they exist in runs/.
# A result JSON that exists is kept (re-running resumes). Results in results/speed/*.json.
# COMPILE=0 decodes eagerly (all three variants): Gemma-3's decode step recompiles every token
# under torch.compile with transformers 5.24's static cache (a Python int in the cache state).
# Usage: [TOKENS=N] [PROMPT_LEN=P] [THREADS=T] [COMPILE=0] [SPQR="name ..."] benchmarks/decode.sh [MODEL ...]
set -euo pipefail
cd "$(dirname "$0")/.."
LOWBIT=${LOWBIT:-.venv/bin/lowbit}
OUT=results/speed
mkdir -p "$OUT" runs
BENCH=(--tokens "${TOKENS:-64}" --prompt-len "${PROMPT_LEN:-128}")
if [ -n "${THREADS:-}" ]; then BENCH+=(--threads "$THREADS"); fi
if [ "${COMPILE:-1}" = 0 ]; then BENCH+=(--no-compile); fi
bench() {  # DIR, result name
  [ -f "$OUT/$2.json" ] && return
  "$LOWBIT" bench decode "$1" "${BENCH[@]}" --json "$OUT/$2.json"
}
for m in ${*:-smollm2-135m gemma3-270m}; do
  rtn=runs/$m-rtn-w4-g128
  if [ ! -f "$rtn/lowbit.json" ]; then
    "$LOWBIT" quantize "$m" --method rtn --bits 4 --group-size 128 --sym --ragged-groups \
      --nsamples 32 --seqlen 512 --out "$rtn"
  fi
  bench "$rtn" "$m-rtn-w4-g128"
  for name in ${SPQR:-spqr-w3-t1-d001 spqr-w4-d001}; do
    dir=runs/$m-$name
    [ -f "$dir/lowbit.json" ] || continue
    bench "$dir" "$m-$name"
  done
done
