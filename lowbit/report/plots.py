"""PNG charts: quality against average bits (Pareto front marked) and per-layer errors.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display needed).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from lowbit.errors import LowbitError
from lowbit.report.results import Metric, Run


def pareto_front(points: list[tuple[float, float]], lower_is_better: bool = True) -> list[int]:
    """Indices of the points ``(bits, quality)`` no other point dominates, sorted by bits.

    A point dominates another when it has no more bits and no worse quality, and is strictly
    better in one of them. Quality is better when lower (``lower_is_better``) or higher.
    """
    sign = 1.0 if lower_is_better else -1.0
    keyed = [(b, sign * q) for b, q in points]
    front = [
        i
        for i, (b, q) in enumerate(keyed)
        if not any(
            b2 <= b and q2 <= q and (b2 < b or q2 < q) for j, (b2, q2) in enumerate(keyed) if j != i
        )
    ]
    return sorted(front, key=lambda i: (points[i][0], sign * points[i][1]))


def plot_quality_vs_bits(runs: list[Run], metric: Metric, path: str | Path) -> Path:
    """One point per run with ``avg_bits`` and ``metric``: quality against bits per weight
    (log2 x axis so 3, 4 and 32 bits all read), error bars where lm-eval gives a stderr. Runs
    are grouped by base model (one colour each) and each group's Pareto front is drawn as a
    step line with ringed points. Returns the PNG path."""
    usable = [r for r in runs if r.avg_bits is not None and metric.value(r) is not None]
    if metric.kind == "kld":
        usable = [r for r in usable if r.method != "none"]
    if not usable:
        raise LowbitError(
            f"no run has both avg_bits and {metric.spec}; pick another --metric "
            "(kld, ppl:CORPUS or TASK:METRIC)"
        )
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in usable:
        groups[run.base or "model"].append(run)
    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    ax = fig.add_subplot()
    ax.set_xscale("log", base=2)
    for g, (base, members) in enumerate(groups.items()):
        color = f"C{g % 10}"
        pts = [(r.avg_bits, metric.value(r)) for r in members]
        for run, (bits, value) in zip(members, pts, strict=True):
            err = metric.stderr(run)
            ax.errorbar(bits, value, yerr=err, fmt="o", color=color, markersize=6, capsize=3)
            ax.annotate(
                run.label,
                (bits, value),
                textcoords="offset points",
                xytext=(6, 4 - 10 * (g % 2)),
                fontsize=7,
                color=color,
            )
        front = pareto_front(pts, metric.lower_is_better)
        fx = [pts[i][0] for i in front]
        fy = [pts[i][1] for i in front]
        ax.step(fx, fy, where="post", color=color, linewidth=1.2, label=f"{base}: Pareto front")
        ax.scatter(fx, fy, s=150, facecolors="none", edgecolors=color, linewidths=1.4)
    bits_all = [r.avg_bits for r in usable]
    values = [metric.value(r) for r in usable]
    ticks = _bit_ticks(bits_all)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks], fontsize=8)
    ax.set_xlim(min(ticks + bits_all) / 1.08, max(ticks + bits_all) * 1.08)
    ax.minorticks_off()
    if metric.kind in ("kld", "ppl") and min(values) > 0:
        ax.set_yscale("log")
        _plain_ticks(ax.yaxis, values)
    ax.set_xlabel("average bits per weight (quantized linears; log scale)")
    better = "lower" if metric.lower_is_better else "higher"
    ax.set_ylabel(f"{metric.title} ({better} is better)")
    ax.set_title(f"{metric.title} vs bits", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<block>\d+)\.(?P<linear>.+)$")


def plot_layer_errors(run: Run, path: str | Path) -> Path:
    """Per-layer errors of a quantize run: relative weight error and relative output
    (Hessian-weighted) error by block, one line per linear type; log y. Returns the PNG path."""
    if not run.layers:
        raise LowbitError(
            f"run {run.label} has no per-layer report; give the JSON of `lowbit quantize --json`"
        )
    series: dict[str, dict[str, list[tuple[int, float]]]] = {
        "weight_rel_err": defaultdict(list),
        "hessian_rel_err": defaultdict(list),
    }
    for k, layer in enumerate(run.layers):
        m = _LAYER.match(str(layer.get("name", "")))
        block, linear = (int(m["block"]), m["linear"]) if m else (k, str(layer.get("name", k)))
        for key, lines in series.items():
            if isinstance(layer.get(key), int | float):
                lines[linear].append((block, float(layer[key])))
    fig = Figure(figsize=(10.0, 4.2), dpi=120)
    titles = {
        "weight_rel_err": "relative weight error ||W - Q||/||W||",
        "hessian_rel_err": "relative output error tr(E H E^T) / tr(W H W^T)",
    }
    for pos, (key, lines) in enumerate(series.items(), start=1):
        ax = fig.add_subplot(1, 2, pos)
        for linear, values in lines.items():
            xs, ys = zip(*sorted(values), strict=True)
            ax.plot(xs, ys, marker=".", linewidth=1, label=linear.split(".")[-1])
        if any(v > 0 for lines_ in lines.values() for _, v in lines_):
            ax.set_yscale("log")
            _plain_ticks(ax.yaxis, [v for vs in lines.values() for _, v in vs])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("block")
        ax.set_title(titles[key], fontsize=9)
        ax.grid(True, alpha=0.3)
    fig.axes[-1].legend(fontsize=7, ncol=2, loc="lower right")
    bits = f", {run.avg_bits:.3f} bits/w" if run.avg_bits is not None else ""
    fig.suptitle(f"{run.label}: per-layer quantization error ({run.method}{bits})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _plain_ticks(axis, values: list[float]) -> None:
    """Log-axis labels as plain numbers (0.2, 0.5, 30) rather than powers of ten; between powers
    of ten every tick is labelled when the data span less than a factor of 10, else 2x and 5x."""
    fmt = FuncFormatter(lambda v, _pos: f"{v:g}")
    axis.set_major_formatter(fmt)
    positive = [v for v in values if v > 0]
    if not positive or max(positive) / min(positive) > 10:
        axis.set_minor_formatter(FuncFormatter(lambda v, _pos: _leading_2_or_5(v)))
    else:
        axis.set_minor_formatter(fmt)


def _leading_2_or_5(v: float) -> str:
    text = f"{v:g}"
    return text if text.lstrip("0.")[:1] in ("2", "5") else ""


def _bit_ticks(bits: list[float]) -> list[float]:
    """Whole bit widths from the lowest to the highest run (2, 3, 4, ..., 8, 16, 32)."""
    lo, hi = math.floor(min(bits)), math.ceil(max(bits))
    candidates = [b for b in (*range(1, 9), 12, 16, 24, 32) if lo <= b <= hi]
    return candidates or sorted({round(b, 3) for b in bits})


def _save(fig, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
