"""Check that M1/M2 ZeroQuant-FP checkpoints store power-of-two scales, from the saved files.

M1: every group scale is an E8M0 byte, so its value is exactly 2^k. M2: an fp16 scale per output
channel times E8M0 group ratios 2^k. For each saved DIR, every layer's ``scales`` tensor is read
from the safetensors file, decoded with the E8M0 format, and checked to be an exact power of two
(``frexp`` mantissa 0.5); each layer is then checked to cast exactly to an E4M3 matrix times a
row scale (:func:`lowbit.kernels.fp8_gpu.fp8_weight`, what the Hopper path runs). Prints a table
and writes JSON.

Usage: python benchmarks/zqfp_check_scales.py DIR ... [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open

from lowbit import api
from lowbit.export.lowbit_format import WEIGHTS
from lowbit.formats.element import get_format
from lowbit.kernels.fp8_gpu import fp8_weight
from lowbit.nn.quant_linear import QuantLinear


def check_dir(path: Path) -> dict:
    """Counts of layers / scales checked and of failures in one saved DIR."""
    manifest = json.loads((path / "lowbit.json").read_text())
    e8m0 = get_format("e8m0")
    layers = scales = not_pow2 = 0
    rules = set()
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        for name, layer in manifest["layers"].items():
            rules.add(layer["weight"]["config"]["scale_rule"])
            raw = f.get_tensor(f"{name}.scales")
            layers += 1
            scales += raw.numel()
            if raw.dtype != torch.uint8:  # not E8M0 bytes: not constrained
                not_pow2 += raw.numel()
                continue
            not_pow2 += int((torch.frexp(e8m0.decode(raw))[0] != 0.5).sum())
    not_fp8 = sum(
        fp8_weight(m.stored_weight()) is None
        for m in api.load_model(str(path)).model.modules()
        if isinstance(m, QuantLinear)
    )
    return {"dir": str(path), "rules": sorted(rules), "layers": layers, "scales": scales,
            "not_power_of_two": not_pow2, "layers_not_exact_fp8": not_fp8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [check_dir(d) for d in args.dirs]
    print("| checkpoint | rule | layers | scales | not 2^k | layers not exact in E4M3 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dir']} | {','.join(r['rules'])} | {r['layers']} | {r['scales']} | "
              f"{r['not_power_of_two']} | {r['layers_not_exact_fp8']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if any(r["not_power_of_two"] or r["layers_not_exact_fp8"] for r in rows):
        raise SystemExit("some scales are not powers of two or some layers do not cast exactly")


if __name__ == "__main__":
    main()
