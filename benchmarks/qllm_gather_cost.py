"""Run-time cost of QLLM's remaining reassembly gather, as a ratio to the plain quantized linear.

Two layers with SmolLM2-135M's shapes (gate 576 -> 1536, down 1536 -> 576), W4 per-channel
asymmetric, activations int4 asymmetric per token (simulated), with and without a reassembly
that splits 5% of the channels (10% extra, merged back to the same width, as QLLM's cap), its
divisors folded into the producer as QLLM installs it (so the layer gathers and adds). Each
case is timed in the same run, alternating plain and reassembled five times (each timing the
median of repeated calls, torch.utils.benchmark; the median of the five ratios is reported), fp32
(the reference path) and bf16 (the CPU int4 kernel), for 1 token (decoding) and 512 tokens
(prefill). Prints a table and writes JSON.

Usage: python benchmarks/qllm_gather_cost.py [--json results/qllm/gather_cost.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
from torch.utils import benchmark

from lowbit.algorithms.reassembly import build_plan, reassemble_weight
from lowbit.algorithms.wa_quant import WAConfig, quantized_linear

REPEATS = 5  # alternating plain / reassembled timings; the median ratio is reported
SHAPES = {"gate 576->1536": (1536, 576), "down 1536->576": (576, 1536)}


def _layers(rows: int, cols: int, seed: int = 0):
    """(plain, reassembled) QuantLinears of the same weight, and the reassembly's stats."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) / cols**0.5
    x = torch.randn(2048, cols, generator=g)
    outliers = torch.randperm(cols, generator=g)[: cols // 20]
    x[:, outliers] *= 3  # 5% of channels split in two (extra = 5% of the width)
    absmax = x.abs().amax(0)
    theta = float(absmax[outliers].min()) * 0.999
    plan = build_plan(x, absmax, w, theta)
    cfg = WAConfig(bits=4, abits=4)
    plain = quantized_linear(cfg, w, None)
    folded = plan.gather_only().module(cols)
    reassembled = quantized_linear(cfg, reassemble_weight(w, plan), None, folded)
    return plain, reassembled, plan


def _time(layer, x) -> float:
    with torch.inference_mode():
        layer(x)  # prepare the kernel once
        t = benchmark.Timer("layer(x)", globals={"layer": layer, "x": x})
        return t.blocked_autorange(min_run_time=0.3).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="results/qllm/gather_cost.json")
    args = parser.parse_args()
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        plain, reassembled, plan = _layers(out_f, in_f)
        for dtype in (torch.float32, torch.bfloat16):
            for tokens in (1, 512):
                x = torch.randn(tokens, in_f).to(dtype)
                pairs = [(_time(plain, x), _time(reassembled, x)) for _ in range(REPEATS)]
                ratios = sorted(r / p for p, r in pairs)
                rows.append({
                    "layer": name, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
                    "extra_channels": plan.extra, "merged_pairs": plan.merged,
                    "plain_us": statistics.median(p for p, _ in pairs) * 1e6,
                    "reassembled_us": statistics.median(r for _, r in pairs) * 1e6,
                    "ratio": statistics.median(ratios),
                    "ratio_min_max": [ratios[0], ratios[-1]],
                })
    print("| layer | dtype | tokens | plain µs | with gather µs | ratio (min-max) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["ratio_min_max"]
        print(f"| {r['layer']} | {r['dtype']} | {r['tokens']} | {r['plain_us']:.1f} | "
              f"{r['reassembled_us']:.1f} | {r['ratio']:.3f} ({lo:.2f}-{hi:.2f}) |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"threads": torch.get_num_threads(), "cpu": platform.processor(),
               "torch": torch.__version__}
    out.write_text(json.dumps({"rows": rows, "reassembly": "divisors folded: gather and add",
                               "machine": machine}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
