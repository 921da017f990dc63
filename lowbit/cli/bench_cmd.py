"""``lowbit bench decode MODEL_OR_DIR``: decode/prefill speed against the base model in fp32 and
bf16, bytes per token and the fraction of the measured memory bandwidth (docs/SPEED.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lowbit.cli.table import render
from lowbit.errors import LowbitError, user_input


def add_bench_parser(sub) -> None:
    """Register ``bench`` (with its ``decode`` benchmark) on the top-level subparsers."""
    p = sub.add_parser("bench", help="speed benchmarks: table and JSON")
    kinds = p.add_subparsers(dest="bench", required=True)
    d = kinds.add_parser(
        "decode",
        help="batch-1 decode and prefill tokens/s vs the base model in fp32 and bf16",
        description="Times greedy batch-1 decoding (static KV cache, compiled decode step) and "
        "prefill of MODEL_OR_DIR: a lowbit DIR runs quantized (bf16 activations) and its base "
        "model in fp32 and bf16; a bundled name or HF folder runs in fp32 and bf16.",
    )
    d.add_argument("model", metavar="MODEL_OR_DIR", help="lowbit DIR, bundled name or HF folder")
    d.add_argument("--tokens", type=int, default=64, help="tokens generated per run (default 64)")
    d.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    d.add_argument(
        "--no-compile", dest="compile", action="store_false", help="decode eagerly (no compile)"
    )
    d.add_argument("--prefill-repeats", type=int, default=3, help="prefills timed (best counts)")
    d.add_argument("--corpus", default="austen-pp", help="text the prompt is cut from")
    d.add_argument(
        "--quant-dtype", choices=["bf16", "fp32"], default="bf16",
        help="activation dtype of the quantized model (default bf16: the int4/int8 kernels)",
    )
    d.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    d.add_argument(
        "--device", default="auto", metavar="D",
        help="auto (default: cuda when available, else cpu), cpu, cuda or cuda:N: where every "
        "variant runs",
    )
    d.add_argument("--json", metavar="FILE", help="write the results as JSON")
    d.set_defaults(func=decode)


def decode(args: argparse.Namespace) -> int:
    import torch

    from lowbit import api
    from lowbit.infer.bench import DecodeBenchConfig, run_decode_bench

    if args.threads is not None:
        if args.threads < 1:
            raise LowbitError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    with user_input("--tokens, --prompt-len, --prefill-repeats", "raise the one below its minimum"):
        cfg = DecodeBenchConfig(
            args.tokens, args.prompt_len, args.compile, args.prefill_repeats, args.corpus,
            args.quant_dtype, device=str(api.as_device(args.device)),
        )
    report = run_decode_bench(args.model, cfg, progress=lambda m: print(m, file=sys.stderr))
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def format_report(report: dict) -> str:
    """The printed table (one row per variant, ratios against base fp32 and bf16) and notes."""
    rows_in = report["variants"]
    ref = {v["dtype"]: v for v in rows_in if v["label"] == "base"}
    rows = []
    for v in rows_in:
        rows.append([
            v["label"], v["dtype"], _paths(v["kernel_paths"]),
            round(v["decode_tokens_per_s"], 2), *_ratio(v, ref, "decode_tokens_per_s"),
            round(v["prefill_tokens_per_s"], 1), *_ratio(v, ref, "prefill_tokens_per_s"),
            round(v["bytes_per_token"] / 2**20, 1), round(v["achieved_gbs"], 2),
            f"{100 * v['fraction_of_copy_bandwidth']:.1f}%",
        ])
    headers = ["model", "dtype", "kernels", "decode tok/s", "x fp32", "x bf16",
               "prefill tok/s", "x fp32", "x bf16", "MiB/token", "GB/s", "% of copy bw"]
    m = report["machine"]
    lines = [
        f"{report['model']}" + (f" ({report['method']}, {report['avg_bits']:.2f} bits/weight; "
                                f"base {report['base_model']})" if report.get("method") else ""),
        render(headers, rows),
        f"memory bandwidth ({m['threads']} threads): copy {m['copy_gbs']:.1f} GB/s "
        f"(read + write), read {m['read_gbs']:.1f} GB/s; bytes/token = weights as read + "
        "static KV cache",
    ]
    if report["ratios"]:
        head = "quantized" if report.get("method") else "bf16"
        lines.append(f"{head}: " + ", ".join(
            f"{k.replace('_vs_', ' vs ')} {v:.2f}x" for k, v in report["ratios"].items()
        ))
    for v in rows_in:
        if v["compile_note"]:
            lines.append(f"{v['label']} {v['dtype']}: {v['compile_note']}")
    return "\n".join(lines)


def _ratio(v: dict, ref: dict, key: str) -> list[str]:
    return [f"{v[key] / ref[d][key]:.2f}x" if d in ref else "-" for d in ("fp32", "bf16")]


def _paths(paths: dict[str, int]) -> str:
    return ", ".join(f"{n} {p}" for p, n in paths.items()) or "torch dense"
