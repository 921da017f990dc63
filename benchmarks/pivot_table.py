"""Paper-style markdown table from result JSONs named ``<row>[-<suffix>].json`` in one folder.

Each row of the table is one setting; each column group is one suffix (e.g. ``""`` and
``lorc8``: files ``<row>.json`` and ``<row>-lorc8.json``, ZeroQuant-FP without and with LoRC),
showing austen-pp and brown perplexity and KLD (missing runs show "-"). The row ``w16a16``
always reads ``w16a16.json``.

Usage: python benchmarks/pivot_table.py DIR --rows w16a16 w4a8-int-int ... \
           [--suffixes "" lorc8] [--labels "no LoRC" "LoRC 8"]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cells(path: Path) -> list[str]:
    if not path.is_file():
        return ["-", "-", "-"]
    r = json.loads(path.read_text())
    ppl = r.get("ppl", {})
    kld = r.get("kld")
    return [
        f"{ppl['austen-pp']:.2f}" if "austen-pp" in ppl else "-",
        f"{ppl['brown']:.2f}" if "brown" in ppl else "-",
        "-" if kld is None else f"{kld:.4f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--rows", nargs="+", required=True)
    parser.add_argument("--suffixes", nargs="+", default=[""])
    parser.add_argument("--labels", nargs="+", default=None)
    args = parser.parse_args()
    labels = args.labels or [s or "-" for s in args.suffixes]
    head = ["setting"] + [f"{lab}: {c}" for lab in labels for c in ("ppl austen-pp", "ppl brown",
                                                                      "KLD")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in args.rows:
        cells = [row]
        for suffix in args.suffixes:
            path = args.folder / (f"{row}-{suffix}.json" if suffix else f"{row}.json")
            if row == "w16a16":
                path = args.folder / "w16a16.json"
            cells += _cells(path)
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
