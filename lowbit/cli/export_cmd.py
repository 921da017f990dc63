"""``lowbit export DIR --format {compressed-tensors,gptq,spqr} --out DIR2``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FORMATS = ("compressed-tensors", "gptq", "spqr")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``export`` sub-command on the main parser's subparsers."""
    p = sub.add_parser("export", help="write a lowbit DIR in a format serving engines load")
    p.add_argument("model", metavar="DIR", help="lowbit DIR (from `lowbit quantize`)")
    p.add_argument("--format", required=True, choices=FORMATS, help="target checkpoint format")
    p.add_argument("--out", required=True, metavar="DIR2", help="output folder (new or empty)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
