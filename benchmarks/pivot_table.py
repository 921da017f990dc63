"""Paper-style markdown table from result JSONs named ``<row>[-<suffix>].json`` in one folder.

Each row of the table is one setting; each column group is one suffix (e.g. ``""`` and
``lorc8``: files ``<row>.json`` and ``<row>-lorc8.json``, ZeroQuant-FP without and with LoRC),
showing austen-pp and brown perplexity and KLD (missing runs show "-"). The row ``w16a16``
always reads ``w16a16.json``.

With ``--change`` and two suffixes, each cell is "first -> second" instead (e.g. what LoRC
changes), with the average bits of both and whether all three measures went down.

Usage: python benchmarks/pivot_table.py DIR --rows w16a16 w4a8-int-int ... \
           [--suffixes "" lorc8] [--labels "no LoRC" "LoRC 8"] [--change]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _measures(path: Path) -> list[float | None]:
    """[ppl austen-pp, ppl brown, KLD, avg bits] of one result (None: missing)."""
    if not path.is_file():
        return [None] * 4
    r = json.loads(path.read_text())
    ppl = r.get("ppl", {})
    return [ppl.get("austen-pp"), ppl.get("brown"), r.get("kld"), r.get("avg_bits")]


def _fmt(values: list[float | None]) -> list[str]:
    digits = (2, 2, 4, 3)
    return ["-" if v is None else f"{v:.{d}f}" for v, d in zip(values, digits, strict=True)]


def _cells(path: Path) -> list[str]:
    return _fmt(_measures(path))[:3]


def _change_row(row: str, first: Path, second: Path) -> list[str]:
    a, b = _measures(first), _measures(second)
    if None in a[:3] or None in b[:3]:
        return [row, "-", "-", "-", "-", "-"]
    arrows = [f"{x} -> {y}" for x, y in zip(_fmt(a), _fmt(b), strict=True)]
    lower = all(y < x for x, y in zip(a[:3], b[:3], strict=True))
    return [row, *arrows, "yes" if lower else "no"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--rows", nargs="+", required=True)
    parser.add_argument("--suffixes", nargs="+", default=[""])
    parser.add_argument("--labels", nargs="+", default=None)
    parser.add_argument("--change", action="store_true",
                        help="two suffixes: print first -> second per measure")
    args = parser.parse_args()
    if args.change:
        if len(args.suffixes) != 2:
            parser.error("--change takes exactly two --suffixes")
        _print_changes(args.folder, args.rows, args.suffixes)
        return
    labels = args.labels or [s or "-" for s in args.suffixes]
    head = ["setting"] + [f"{lab}: {c}" for lab in labels for c in ("ppl austen-pp", "ppl brown",
                                                                      "KLD")]
    rows = []
    for row in args.rows:
        cells = [row]
        for suffix in args.suffixes:
            path = args.folder / (f"{row}-{suffix}.json" if suffix else f"{row}.json")
            if row == "w16a16":
                path = args.folder / "w16a16.json"
            cells += _cells(path)
        rows.append(cells)
    _print_table(head, rows)


def _print_changes(folder: Path, rows: list[str], suffixes: list[str]) -> None:
    def path(row: str, suffix: str) -> Path:
        return folder / (f"{row}-{suffix}.json" if suffix else f"{row}.json")

    head = ["setting", "ppl austen-pp", "ppl brown", "KLD", "avg bits", "all three lower"]
    _print_table(head, [_change_row(row, path(row, suffixes[0]), path(row, suffixes[1]))
                        for row in rows])


def _print_table(head: list[str], rows: list[list[str]]) -> None:
    """A markdown table."""
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
