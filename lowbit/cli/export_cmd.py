"""``lowbit export DIR --format {compressed-tensors,gptq,spqr,gguf} --out DIR2|FILE.gguf``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FORMATS = ("compressed-tensors", "gptq", "spqr", "gguf")
GGUF_FLOAT_TYPES = ("f16", "f32", "bf16", "q8_0")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``export`` sub-command on the main parser's subparsers."""
    p = sub.add_parser("export", help="write a lowbit DIR in a format serving engines load")
    p.add_argument("model", metavar="DIR",
                   help="lowbit DIR (from `lowbit quantize`); for --format gguf also a bundled "
                   "model name or a Hugging Face folder (written unquantized)")
    p.add_argument("--format", required=True, choices=FORMATS, help="target checkpoint format")
    p.add_argument("--out", required=True, metavar="DIR2",
                   help="output folder (new or empty); for gguf a new .gguf file")
    p.add_argument("--gguf-float-type", default="f16", choices=GGUF_FLOAT_TYPES,
                   help="gguf: type of the float 2-D weights (token embedding, untied output, "
                   "linears not quantized; every linear of an unquantized model); norms and "
                   "biases are always f32 (default f16)")
    p.add_argument("--dequantize", action="store_true",
                   help="gguf: write quantized layers that no ggml type holds exactly (other "
                   "group sizes, act-order, SpQR, FP formats) as their dequantized weights in "
                   "f32; loses nothing but size. Without it they are refused")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        return _run_gguf(args)
    if args.dequantize or args.gguf_float_type != "f16":
        from lowbit.errors import LowbitError

        raise LowbitError("--dequantize and --gguf-float-type apply to --format gguf only; "
                          "drop them")
    from lowbit.export.provenance import CONFIG_KEY

    if args.format == "compressed-tensors":
        from lowbit.export.compressed_tensors import export_compressed_tensors as export
    elif args.format == "spqr":
        from lowbit.export.spqr_layout import export_spqr as export
    else:
        from lowbit.export.gptq_layout import export_gptq as export
    out = export(args.model, args.out)
    config = json.loads((Path(out) / "config.json").read_text())
    record = config[CONFIG_KEY]
    qc = config["quantization_config"]
    detail = qc.get("format") or f"{qc['bits']}-bit, " + (
        f"group {qc['group_size']}" if "group_size" in qc else f"{qc['beta1']}x{qc['beta2']} tiles")
    print(f"exported {args.model} -> {out} ({args.format}: {detail}); "
          f"source sha256 {record['source_dir_sha256'][:16]}")
    return 0


def _run_gguf(args: argparse.Namespace) -> int:
    from lowbit.export.gguf_export import export_gguf, summary

    out = export_gguf(args.model, args.out, args.gguf_float_type, args.dequantize)
    print(f"exported {args.model} -> {out} (gguf: {summary(out)})")
    return 0
