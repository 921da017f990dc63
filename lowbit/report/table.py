"""A markdown table across runs: bits, perplexities, KLD and lm-eval accuracies."""

from __future__ import annotations

from lowbit.report.results import Run

_TASK_METRICS = ("acc", "acc_norm", "perplexity", "word_perplexity", "exact_match", "f1")


def markdown_table(runs: list[Run]) -> str:
    """One row per run, most bits first; a column per perplexity corpus, KLD, and each task
    metric any run has (``value ± stderr``). Missing values are ``-``."""
    corpora = _ordered(c for r in runs for c in r.ppl)
    task_cols = _ordered(
        (task, metric)
        for r in runs
        for task, metrics in r.tasks.items()
        for metric in sorted(metrics, key=_metric_rank)
        if not metric.endswith("_stderr")
    )
    headers = ["run", "method", "bits/w"]
    headers += [f"ppl {c}" for c in corpora]
    headers += ["KLD"] if any(r.kld is not None for r in runs) else []
    headers += [f"{t} {m}" for t, m in task_cols]
    rows = []
    for run in sorted(runs, key=lambda r: (-(r.avg_bits or 0.0), r.label)):
        row = [run.label, run.method or "-", _num(run.avg_bits, 3)]
        row += [_num(run.ppl.get(c), 2) for c in corpora]
        if "KLD" in headers:
            row.append(_num(run.kld, 4))
        for task, metric in task_cols:
            metrics = run.tasks.get(task, {})
            value, err = metrics.get(metric), metrics.get(f"{metric}_stderr")
            digits = 2 if "perplexity" in metric else 3
            cell = _num(value, digits)
            if value is not None and err is not None:
                cell += f" ± {err:.{digits}f}"
            row.append(cell)
        rows.append(row)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _metric_rank(metric: str) -> tuple[int, str]:
    base = metric.removesuffix("_stderr")
    rank = _TASK_METRICS.index(base) if base in _TASK_METRICS else len(_TASK_METRICS)
    return rank, metric


def _ordered(items) -> list:
    return list(dict.fromkeys(items))


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
