"""One quantized linear's batch-1 matmul time on every CPU path against dense fp32 and bf16.

Usage: .venv/bin/python benchmarks/layer_speed.py [--rows R] [--cols C] [--threads T]
Prints milliseconds per call and the speed-up over dense fp32 / bf16 (a smoke check of the
kernels; model-level speed is `lowbit bench decode`, see docs/SPEED.md).
"""

from __future__ import annotations

import argparse
import time

import torch

from lowbit.formats.bilevel import bilevel_quantize
from lowbit.formats.intq import IntGrid, rtn_quantize
from lowbit.formats.packed_int import PackedIntWeight
from lowbit.formats.spqr_weight import SpQRWeight
from lowbit.kernels import dispatch
from lowbit.nn.quant_linear import QuantLinear


def per_call_ms(fn, x: torch.Tensor, seconds: float = 0.5) -> float:
    fn(x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(x)
        n += 1
    return (time.perf_counter() - start) / n * 1e3


def random_spqr(rows: int, cols: int, outlier_rate: float = 0.01) -> SpQRWeight:
    """A 3-bit SpQR weight (16x16 groups, act-order, outliers) with random contents: speed
    does not depend on the values, and solving SpQR on a large layer takes minutes."""
    n = -(-cols // 16)
    codes = torch.randint(0, 8, (rows, cols), dtype=torch.uint8)
    scale = bilevel_quantize(torch.rand(rows, n) * 0.01 + 1e-3)
    zero = bilevel_quantize(torch.rand(rows, n) * 7)
    mask = torch.rand(rows, cols) < outlier_rate
    outliers = torch.where(mask, torch.randn(rows, cols), 0.0).half().float()
    return SpQRWeight.from_parts(codes, 3, 16, scale, zero, outliers, torch.randperm(cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w = torch.randn(args.rows, args.cols) * 0.02
    x32 = torch.randn(1, args.cols)
    layers = {}
    for bits, group in ((4, 128), (3, 128), (8, -1), (8, 128)):
        grid = IntGrid(bits, group, symmetric=False)
        stored = PackedIntWeight.from_codes(*rtn_quantize(w, grid), grid)
        layers[f"int{bits} g{group}"] = QuantLinear(stored)
    layers["spqr w3 16x16 1%"] = QuantLinear(random_spqr(args.rows, args.cols))
    with torch.inference_mode():
        wb = w.bfloat16()
        base = {
            "fp32": per_call_ms(lambda x: torch.nn.functional.linear(x, w), x32),
            "bf16": per_call_ms(lambda x: torch.nn.functional.linear(x, wb), x32.bfloat16()),
        }
        print(f"{args.rows}x{args.cols}, batch 1, {torch.get_num_threads()} threads")
        print(f"dense fp32 {base['fp32']:.3f} ms, dense bf16 {base['bf16']:.3f} ms")
        for name, layer in layers.items():
            for dtype in (torch.bfloat16, torch.float32):
                path = dispatch.prepare(layer, dtype)
                ms = per_call_ms(layer, x32.to(dtype))
                print(
                    f"{name:>14} {str(dtype)[6:]:>8} {path:>24}: {ms:7.3f} ms  "
                    f"x{base['fp32'] / ms:5.2f} vs fp32  x{base['bf16'] / ms:5.2f} vs bf16"
                )
                layer.drop_cache()


if __name__ == "__main__":
    main()
