"""Reading the JSON that ``lowbit eval --json`` and ``lowbit quantize --json`` write.

Each file describes one model. Files about the same model are merged into one :class:`Run`:
a quantize report's ``out`` folder and an eval report's ``model`` name the same run when their
normalised paths are equal (``runs/x`` and ``./runs/x/`` match), so ``lowbit compare`` can join a
quantize JSON (bits, per-layer errors, perplexity) with a later ``eval --tasks`` JSON
(accuracies) of the DIR it wrote. Later files fill in and override earlier ones, key by key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError


@dataclass
class Run:
    """One model's merged results.

    Attributes:
        key: normalised model path or name the files were matched on; ``label`` its last part.
        method: ``"none"`` for an unquantized model.
        avg_bits: stored bits per weight of the quantized linears (32.0 for an fp32 model).
        ppl: perplexity per corpus; ``kld``: KL divergence to the base model (nats/token).
        tasks: lm-eval metrics per task, ``{task: {metric: value, metric_stderr: value}}``.
        layers: per-layer reports of a quantize run (``name``, ``weight_rel_err``,
            ``hessian_rel_err``, ``bits_per_weight``, ...).
        base: the model the run was quantized from (a quantize report's ``model``), or the
            model itself for an unquantized one; ``None`` when no file says.
        sources: the files merged, in order.
    """

    key: str
    label: str
    method: str | None = None
    avg_bits: float | None = None
    ppl: dict[str, float] = field(default_factory=dict)
    kld: float | None = None
    tasks: dict[str, dict[str, float | None]] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    base: str | None = None
    sources: list[str] = field(default_factory=list)


def read_result(path: str | Path) -> dict[str, Any]:
    """One result JSON as a dict; ``LowbitError`` for a missing, unreadable or foreign file."""
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"result file {path} not found")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LowbitError(f"{path} is not a JSON file: {exc}") from exc
    if not isinstance(data, dict) or "model" not in data:
        raise LowbitError(
            f"{path} is not a lowbit result (no 'model' key); give files written by "
            "`lowbit eval --json` or `lowbit quantize --json`"
        )
    return data


def run_key(data: dict[str, Any]) -> str:
    """The model a result is about: a quantize report's ``out``, else its ``model``."""
    name = str(data.get("out") or data["model"])
    return os.path.normpath(name)


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Merge result files into runs, in order of first appearance (see the module docstring)."""
    if not paths:
        raise LowbitError("give at least one result JSON file")
    runs: dict[str, Run] = {}
    for path in paths:
        data = read_result(path)
        key = run_key(data)
        run = runs.setdefault(key, Run(key=key, label=Path(key).name or key))
        _merge(run, data)
        run.sources.append(str(path))
    return list(runs.values())


def _merge(run: Run, data: dict[str, Any]) -> None:
    if data.get("method") is not None:
        run.method = str(data["method"])
    if data.get("out") or data.get("method") == "none":
        run.base = Path(os.path.normpath(str(data["model"]))).name
    if isinstance(data.get("avg_bits"), int | float):
        run.avg_bits = float(data["avg_bits"])
    run.ppl.update({k: float(v) for k, v in (data.get("ppl") or {}).items() if v is not None})
    if data.get("kld") is not None:
        run.kld = float(data["kld"])
    for task, metrics in (data.get("tasks") or {}).items():
        run.tasks.setdefault(task, {}).update(metrics)
    if data.get("layers"):
        run.layers = list(data["layers"])


@dataclass(frozen=True)
class Metric:
    """A quality number to plot: ``kld``, ``ppl:CORPUS`` or ``TASK:METRIC`` (lm-eval)."""

    spec: str
    kind: str
    name: str
    sub: str | None = None

    @property
    def lower_is_better(self) -> bool:
        return self.kind in ("kld", "ppl") or self.sub in ("perplexity", "word_perplexity")

    @property
    def title(self) -> str:
        if self.kind == "kld":
            return "KL divergence to base (nats/token)"
        if self.kind == "ppl":
            return f"perplexity ({self.name})"
        return f"{self.name} {self.sub}"

    def value(self, run: Run) -> float | None:
        if self.kind == "kld":
            return 0.0 if run.method == "none" and run.kld is None else run.kld
        if self.kind == "ppl":
            return run.ppl.get(self.name)
        return run.tasks.get(self.name, {}).get(self.sub)

    def stderr(self, run: Run) -> float | None:
        if self.kind != "task":
            return None
        return run.tasks.get(self.name, {}).get(f"{self.sub}_stderr")


def parse_metric(spec: str) -> Metric:
    """``kld`` | ``ppl:CORPUS`` | ``TASK:METRIC`` (e.g. ``lowbit_cloze_austen:acc``)."""
    if spec == "kld":
        return Metric(spec, "kld", "kld")
    head, sep, tail = spec.partition(":")
    if not sep or not head or not tail:
        raise LowbitError(
            f"metric '{spec}' not understood; use kld, ppl:CORPUS or TASK:METRIC "
            "(e.g. ppl:austen-pp, lowbit_cloze_austen:acc)"
        )
    if head == "ppl":
        return Metric(spec, "ppl", tail)
    return Metric(spec, "task", head, tail)


def default_metric(runs: list[Run]) -> Metric:
    """KLD when a quantized run has it, else the first perplexity corpus every run has, else the
    first task metric; ``LowbitError`` when the runs share no quality number."""
    if any(r.kld is not None for r in runs):
        return parse_metric("kld")
    common = set.intersection(*(set(r.ppl) for r in runs)) if runs else set()
    for corpus in runs[0].ppl if runs else []:
        if corpus in common:
            return parse_metric(f"ppl:{corpus}")
    for run in runs:
        for task, metrics in run.tasks.items():
            for metric in metrics:
                if not metric.endswith("_stderr"):
                    return parse_metric(f"{task}:{metric}")
    raise LowbitError("the results share no quality number (kld, ppl or lm-eval task metric)")
