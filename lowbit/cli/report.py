"""``lowbit compare`` and the lm-eval part of ``lowbit eval --tasks``."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from lowbit.cli.table import render
from lowbit.errors import LowbitError


def add_task_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tasks",
        metavar="T,...",
        help="lm-eval tasks, comma-separated: lowbit_cloze_austen, lowbit_nextsent_austen "
        "(offline, built from the bundled prose) or any lm-eval task whose data is on this "
        "machine. With --tasks, perplexity runs only for corpora given with --ppl",
    )
    p.add_argument(
        "--limit",
        type=float,
        help="examples per task (the first N of each; below 1: a fraction of the task)",
    )
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's, or 0)")
    p.add_argument(
        "--batch-size", type=int, default=8, help="lm-eval requests per forward pass (default 8)"
    )


def add_compare_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", metavar="RESULT.json", help="`eval`/`quantize` JSON")
    p.add_argument("--out", metavar="DIR", help="write compare.md and the PNG charts here")
    p.add_argument(
        "--metric",
        help="quality axis of the bits plot: kld, ppl:CORPUS or TASK:METRIC "
        "(default: kld if any run has it, else the first shared perplexity)",
    )
    p.add_argument(
        "--layers-of",
        nargs="*",
        metavar="RUN",
        help="runs (labels) to chart per-layer errors for (default: the first with layers; "
        "none when given no RUN)",
    )


def task_limit(value: float | None) -> int | float | None:
    """``--limit`` as lm-eval takes it: a count (int) from 1 up, a fraction below 1."""
    if value is None:
        return None
    if value <= 0:
        raise LowbitError(f"--limit must be positive, got {value:g}")
    if value >= 1:
        if value != int(value):
            raise LowbitError(f"--limit {value:g}: give a whole number of examples or a fraction")
        return int(value)
    return value


def prepare(args: argparse.Namespace) -> Any:
    """Check and build the ``--tasks`` (before the model is loaded)."""
    from lowbit.eval.lm_eval_adapter import prepare_tasks

    task_limit(args.limit)
    return prepare_tasks(args.tasks)


def run(args: argparse.Namespace, prepared: Any, loaded: Any) -> dict[str, Any]:
    """Run the prepared tasks on ``loaded``, print the table, return the JSON part."""
    from lowbit.eval.lm_eval_adapter import LowbitLM, run_tasks

    lm = LowbitLM.from_loaded(loaded, batch_size=args.batch_size)
    start = time.perf_counter()
    out = run_tasks(lm, prepared, limit=task_limit(args.limit), num_fewshot=args.num_fewshot)
    seconds = time.perf_counter() - start
    print(render(["task", "metric", "value", "stderr", "n"], _rows(out)))
    return {
        "tasks": out["results"],
        "lm_eval": {
            "n_samples": out["n_samples"],
            "limit": out["limit"],
            "num_fewshot": out["num_fewshot"],
            "versions": out["versions"],
            "add_bos": lm.add_bos,
            "seconds": seconds,
        },
    }


def _rows(out: dict[str, Any]) -> list[list[Any]]:
    return [
        [task, metric, value, stderr, out["n_samples"].get(task)]
        for task, metric, value, stderr in out["rows"]
    ]


def compare(args: argparse.Namespace) -> int:
    from lowbit.report import (
        default_metric,
        load_runs,
        markdown_table,
        parse_metric,
        plot_layer_errors,
        plot_quality_vs_bits,
    )

    runs = load_runs(args.results)
    table = markdown_table(runs)
    print(table)
    if not args.out:
        return 0
    out = Path(args.out)
    metric = parse_metric(args.metric) if args.metric else default_metric(runs)
    written = [out / "compare.md"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table + "\n")
    written.append(plot_quality_vs_bits(runs, metric, out / f"bits_vs_{_slug(metric.spec)}.png"))
    by_label = {r.label: r for r in runs}
    if args.layers_of is not None:
        unknown = [name for name in args.layers_of if name not in by_label]
        if unknown:
            raise LowbitError(
                f"--layers-of {', '.join(unknown)}: no such run; runs: {', '.join(by_label)}"
            )
        chosen = [by_label[name] for name in args.layers_of]
    else:
        chosen = [r for r in runs if r.layers][:1]
    for run_ in chosen:
        written.append(plot_layer_errors(run_, out / f"layers_{_slug(run_.label)}.png"))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
