"""Comparison reports across runs: a markdown table, quality-vs-bits and per-layer charts."""

from lowbit.report.plots import pareto_front, plot_layer_errors, plot_quality_vs_bits
from lowbit.report.results import Metric, Run, default_metric, load_runs, parse_metric
from lowbit.report.table import markdown_table

__all__ = [
    "Metric",
    "Run",
    "default_metric",
    "load_runs",
    "markdown_table",
    "pareto_front",
    "parse_metric",
    "plot_layer_errors",
    "plot_quality_vs_bits",
]
