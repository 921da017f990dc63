"""Markdown table from `lowbit eval/quantize --json` results.

Usage: python benchmarks/table.py results/foundation/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    rows = [json.loads(Path(p).read_text()) | {"file": Path(p).stem} for p in sorted(paths)]
    corpora = sorted({c for r in rows for c in r.get("ppl", {})})
    head = [
        "run",
        "method",
        "avg bits",
        *[f"ppl {c}" for c in corpora],
        "KLD",
        "quantize s",
        "peak RSS MiB",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [
            r["file"],
            r.get("method", "-"),
            _f(r.get("avg_bits"), 3),
            *[_f(r["ppl"].get(c), 2) for c in corpora],
            _f(r.get("kld"), 4),
            _f(r.get("seconds") if r.get("method") not in (None, "none") else None, 0),
            _f(r.get("peak_rss_mb"), 0),
        ]
        print("| " + " | ".join(cells) + " |")


def _f(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main(sys.argv[1:])
