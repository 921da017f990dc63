"""Training cost table (time per step, memory) from `lowbit quantize --method lrqat --json`.

Usage: python benchmarks/lrqat_cost.py results/lrqat/*qat-*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEAD = [
    "run",
    "mode",
    "steps",
    "tokens",
    "s/step",
    "CPU s/step",
    "peak RSS MiB",
    "frozen MiB",
    "trainable MiB",
    "grad MiB",
    "AdamW MiB",
    "final loss (last 10)",
]


def main(paths: list[str]) -> None:
    print("| " + " | ".join(HEAD) + " |")
    print("|" + "---|" * len(HEAD))
    for p in sorted(paths):
        t = json.loads(Path(p).read_text()).get("training")
        if not t:
            continue
        mem = t.get("state_mb", {})
        cells = [
            Path(p).stem,
            t["mode"],
            t.get("steps"),
            t.get("tokens"),
            _f(t.get("sec_per_step"), 1),
            _f(t.get("cpu_sec_per_step"), 1),
            _f(t.get("peak_rss_mb"), 0),
            _f(mem.get("frozen_linear_weights"), 0),
            _f(mem.get("trainables"), 0),
            _f(mem.get("gradients"), 0),
            _f(mem.get("optimizer"), 0),
            _f(t.get("loss_last10"), 3),
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")


def _f(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main(sys.argv[1:])
