"""`make demo`: quantize the default bundled model with RTN and GPTQ, evaluate base vs RTN vs
GPTQ (perplexity on Pride and Prejudice, KL divergence to the base), save and reload the GPTQ
model, and print the table."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lowbit import api
from lowbit.cli.main import _quiet_transformers
from lowbit.cli.table import render


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--out", default="out/demo")
    args = parser.parse_args()
    _quiet_transformers()
    calib = api.CalibSpec(nsamples=args.nsamples, seqlen=512)
    settings = {"bits": args.bits, "group_size": args.group_size, "symmetric": True}
    ev = {"ppl": ["austen-pp"], "seqlen": 512, "max_tokens": args.max_tokens}
    base = api.load_model(args.model)
    print(f"[demo] evaluating base {args.model} (fp32, dequantized from its GGUF)", flush=True)
    rows = [_row("base (fp32)", 32.0, None, api.evaluate(base, **ev))]
    for method in ("rtn", "gptq"):
        print(f"[demo] quantizing with {method} W{args.bits} g{args.group_size}", flush=True)
        loaded = api.load_model(args.model)
        result = api.quantize(loaded, api.build_config(method, settings), calib)
        scores = api.evaluate(loaded, kld=True, base=base, **ev)
        rows.append(_row(method, result.avg_bits, result.seconds, scores))
        out = api.save_quantized(loaded, result, Path(args.out) / method)
    start = time.perf_counter()
    reloaded = api.evaluate(api.load_model(str(out)), **ev)
    same = reloaded["ppl"] == scores["ppl"]
    headers = ["model", "avg bits", "ppl austen-pp", "kld", "top-1 agree", "quantize s"]
    print()
    print(render(headers, rows))
    print(
        f"\nW{args.bits} g{args.group_size} symmetric, calibration: {args.nsamples} x 512 tokens "
        f"of austen-emma; evaluation: first {args.max_tokens} tokens of austen-pp, windows of "
        "512; avg bits count the stored codes, scales and act-order permutation of the\n"
        "quantized linears."
    )
    print(
        f"reloaded GPTQ from {out}: ppl {'identical' if same else 'DIFFERENT'} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "demo.json").write_text(
        json.dumps([dict(zip(headers, r, strict=False)) for r in rows])
    )
    return 0 if same else 1


def _row(name: str, bits: float, seconds: float | None, scores: dict) -> list:
    return [
        name,
        bits,
        scores["ppl"]["austen-pp"],
        scores["kld"],
        scores.get("top1_agreement"),
        seconds,
    ]


if __name__ == "__main__":
    sys.exit(main())
