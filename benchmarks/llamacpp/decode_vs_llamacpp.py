"""Decode speed of the same weights in llama.cpp and in lowbit (issue 21, item 5): llama-bench
``tg`` of each exported GGUF beside ``lowbit bench decode`` of the lowbit DIR it came from, in
one run, same thread count, same context before the timed tokens (gguf_vs_llamacpp.py's speed
step on pairs you name).

Usage (repository root, lowbit's python, after benchmarks/llamacpp/setup.sh):
    .venv/bin/python benchmarks/llamacpp/decode_vs_llamacpp.py --base BASE.gguf \
        LABEL=DIR:FILE.gguf [LABEL=DIR:FILE.gguf ...] [--threads 2] [--tokens 128]
BASE.gguf is the model unquantized in f32 (``lowbit export MODEL --format gguf
--gguf-float-type f32``); lowbit's report of every DIR also times its base in fp32 and bf16.
Prints a table and writes --json (default results/gguf/decode_speed.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_vs_llamacpp import speed  # noqa: E402  (the benchmark's own module, beside this one)


def parse_pairs(pairs: list[str]) -> tuple[dict[str, Path], dict[str, Path]]:
    """``LABEL=DIR:FILE.gguf`` items -> ({label: gguf}, {label: lowbit DIR})."""
    ggufs, dirs = {}, {}
    for item in pairs:
        label, _, rest = item.partition("=")
        qdir, _, gguf = rest.rpartition(":")
        if not (label and qdir and gguf):
            sys.exit(f"'{item}' is not LABEL=DIR:FILE.gguf")
        ggufs[label], dirs[label] = Path(gguf), Path(qdir)
    return ggufs, dirs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pairs", nargs="+", help="LABEL=DIR:FILE.gguf")
    p.add_argument("--base", type=Path, required=True, help="the f32 GGUF of the base model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--work", type=Path, default=Path("runs/gguf-bench/decode"))
    p.add_argument("--json", type=Path, default=Path("results/gguf/decode_speed.json"))
    args = p.parse_args()
    ggufs, dirs = parse_pairs(args.pairs)
    args.work.mkdir(parents=True, exist_ok=True)
    result = speed(args.work, {"base-f32": args.base, **ggufs}, dirs, args.threads, args.tokens)
    print("| label | llama.cpp tok/s | lowbit tok/s (quantized, bf16 activations) | "
          "lowbit base fp32 | lowbit base bf16 |\n|---|---|---|---|---|")
    for label, rep in result["lowbit_bench_decode"].items():
        by = {(v["label"], v["dtype"]): v["decode_tokens_per_s"] for v in rep["variants"]}
        q = next(v for k, v in by.items() if k[0] == "quantized")
        print(f"| {label} | {result['llama_bench'][label]['tokens_per_s']:.1f} | {q:.1f} | "
              f"{by[('base', 'fp32')]:.1f} | {by[('base', 'bf16')]:.1f} |")
    print(f"| base-f32 GGUF | {result['llama_bench']['base-f32']['tokens_per_s']:.1f} | | | |")
    for name, ratio in result["ratios"].items():
        print(f"{name}: {ratio:.2f}")
    print(f"load: {result['uptime_before']} -> {result['uptime_after']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": " ".join(sys.argv), **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
