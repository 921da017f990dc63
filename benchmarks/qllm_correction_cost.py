"""QLLM error-correction stage: time, peak memory and loss per run, from `--json` reports.

Each layer of a QLLM run with correction records its block group's facts (seconds, peak RSS of
the stage, steps, the group's MSE before training and after the merge); this collects one row per
run: groups, steps per group, total and per-group seconds, the largest stage peak RSS, the whole
run's seconds and peak RSS, and the mean relative drop of the group loss.

Usage: python benchmarks/qllm_correction_cost.py results/qllm/*/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summary(path: Path) -> dict | None:
    run = json.loads(path.read_text())
    groups = {}
    for layer in run.get("layers", []):
        extra = layer.get("extra", {})
        if "correction_seconds" in extra:
            groups[tuple(extra["correction_blocks"])] = extra
    if not groups:
        return None
    facts = list(groups.values())
    drops = [1 - f["correction_loss_after_merge"] / f["correction_loss_before"] for f in facts]
    seconds = sum(f["correction_seconds"] for f in facts)
    return {
        "run": f"{path.parent.name}/{path.stem}",
        "groups": len(facts),
        "steps_per_group": facts[0]["correction_steps"],
        "correction_s": seconds,
        "s_per_group": seconds / len(facts),
        "share_of_run": seconds / run["seconds"],
        "correction_peak_rss_mb": max(f["correction_peak_rss_mb"] for f in facts),
        "rss_scope": facts[0]["correction_peak_rss_scope"],
        "run_peak_rss_mb": run.get("peak_rss_mb"),
        "mean_loss_drop": sum(drops) / len(drops),
    }


def main(paths: list[str]) -> None:
    rows = [r for r in (summary(Path(p)) for p in sorted(paths)) if r]
    head = ["run", "groups", "steps/group", "correction s", "s/group", "share of run",
            "stage peak RSS MiB", "run peak RSS MiB", "group MSE drop"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['run']} | {r['groups']} | {r['steps_per_group']} | {r['correction_s']:.0f} | "
              f"{r['s_per_group']:.0f} | {r['share_of_run']:.0%} | "
              f"{r['correction_peak_rss_mb']:.0f} | {r['run_peak_rss_mb']:.0f} | "
              f"{r['mean_loss_drop']:.1%} |")


if __name__ == "__main__":
    main(sys.argv[1:])
