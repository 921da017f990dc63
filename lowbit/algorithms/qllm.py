"""QLLM (Liu et al. 2023): adaptive channel reassembly + efficient error correction for
weight-activation quantization (W4A4, W4A8, W6A6).

Per block, for each group of linears that shares an input (q/k/v, gate/up, down; o_proj is
quantized but not reassembled):

1. statistics of the group's input over the calibration set (per-channel ``max|x|``, a token
   sample for pair scores), taken after the groups before it are quantized;
2. the threshold ``theta`` is searched (:func:`~lowbit.algorithms.reassembly.threshold_candidates`)
   among the points where the number of extra channels changes, up to
   ``channel_ratio * C`` extra channels, and the one with the least MSE of the next op's output
   (attention output for q/k/v, ``act(gate) * up`` for gate/up, down's output for down) against
   the full-precision block is kept; ``theta = max|x|`` (no reassembly) is always a candidate;
3. the plan's divisors (``1/T`` of a split channel, ``1/2`` of a merged pair) are folded into
   what produces the input, the norm's gain for q/k/v and gate/up and ``up_proj``'s rows for
   down (``up_proj`` is re-rounded from its scaled weight), so what stays at run time is an
   index gather and add (``fold_scales``; it is skipped, and the layer scales, where a reader
   of the input is not quantized or no producer is known);
4. the linears become :class:`~lowbit.nn.quant_linear.QuantLinear` with the reassembly,
   per-token asymmetric activation quantization and per-channel asymmetric min-max integer
   weights (RTN on the reassembled weight).

With ``correction`` on, every ``group_blocks`` blocks the error correction of
:mod:`lowbit.algorithms.qllm_correction` trains low-rank terms and the norm gains, merges and
re-quantizes. With both ``reassembly`` and ``correction`` off this is the RTN W/A baseline.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.algorithms.qllm_correction import correct_group
from lowbit.algorithms.reassembly import (
    PAIR_SCORES,
    Plan,
    build_plan,
    reassemble_weight,
    threshold_candidates,
)
from lowbit.algorithms.smoothquant import fold_into_norm, scale_rows
from lowbit.algorithms.wa_quant import (
    ObservationPoints,
    WAConfig,
    input_stats,
    quantized_linear,
    search_windows,
)
from lowbit.algorithms.weight_config import check_rank
from lowbit.core.config import option
from lowbit.core.method import register
from lowbit.core.report import LayerReport
from lowbit.errors import LowbitError
from lowbit.nn.act_quant import ActQuantizer
from lowbit.nn.quant_linear import QuantLinear


@dataclass(frozen=True)
class QLLMConfig(WAConfig):
    """QLLM settings: the weights and activations of :class:`WAConfig`, the channel reassembly
    and the efficient error correction."""

    method = "qllm"
    reassembly: bool = option(True, "adaptive channel reassembly on the inputs of q/k/v, "
                                    "gate/up and down")
    assemble: bool = option(True, "merge similar channel pairs to keep the channel count (off: "
                                  "the input widens by the disassembled channels)")
    pair_score: str = option(
        "code",
        "code (the authors' ((sum w_a + sum w_b) ||x_a - x_b||)^2) or eq5 (the paper's "
        "||(x_a - x_b)(w_a - w_b) / 2||^2)",
        choices=tuple(PAIR_SCORES),
    )
    channel_ratio: float = option(0.1, "cap on extra channels per input, as a fraction of its "
                                       "width")
    search_steps: int = option(12, "thresholds tried per input (spread over the extra-channel "
                                   "counts)")
    fold_scales: bool = option(True, "fold the reassembly's divisors into the norm gain or "
                                     "up_proj rows that produce the input, leaving a pure "
                                     "gather at run time")
    correction: bool = option(True, "efficient error correction (low-rank terms and norm gains "
                                    "trained per group of blocks, merged and re-quantized)")
    group_blocks: int = option(4, "blocks per error-correction group (4 in the paper; 1 for "
                                  "tight memory)")
    rank: int = option(4, "rank of the low-rank terms")
    alpha: float = option(1.0, "scale of the low-rank terms: alpha / rank")
    lr: float = option(5e-4, "AdamW learning rate")
    epochs: int = option(10, "passes over the calibration windows per group")
    micro_batch: int = option(1, "calibration windows per optimizer step")
    tune_norms: bool = option(True, "also train the gains of the norms feeding the linears")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pair_score not in PAIR_SCORES:
            raise LowbitError(
                f"pair score '{self.pair_score}' unknown; known: {', '.join(PAIR_SCORES)}"
            )
        if not 0 <= self.channel_ratio <= 1:
            raise LowbitError(f"channel_ratio must be in [0, 1], got {self.channel_ratio}")
        for name in ("search_steps", "group_blocks", "rank", "epochs", "micro_batch"):
            if getattr(self, name) < 1:
                raise LowbitError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "alpha"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise LowbitError(f"{name} must be a finite number > 0, got {value}")

    def blocks_per_group(self) -> int:
        """The error correction trains over ``group_blocks`` consecutive blocks."""
        return self.group_blocks

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """The correction's low-rank terms: rank at most min(rows, columns) of every layer."""
        super().check_shapes(shapes)
        if self.correction:
            check_rank(self, "--rank", self.rank, shapes)


def reassembled_groups(table) -> set[str]:
    """First linears of the groups whose input is reassembled: norm-fed groups and the last,
    except mixture-of-experts matrices (an expert's tokens, and so the outputs the search
    compares, change with the routing; experts get the plain W/A grid)."""
    fed = {linears[0] for _norm, linears in table.norm_feeds}
    return {n for n in fed | {table.sequential[-1][0]} if not table.is_expert(n)}


@register(
    QLLMConfig,
    "QLLM: channel reassembly + low-rank error correction, W4A4/W4A8/W6A6",
    finish_group=lambda config, group, reports: (
        correct_group(config, group, reports) if config.correction else
        [r for block in reports for r in block]
    ),
)
def apply_block(config: QLLMConfig, ctx) -> list[LayerReport]:
    names = [n for n in ctx.table.linear_names if not config.ignores(ctx.full_name(n))]
    windows = [ctx.on_device(x) for x in search_windows(ctx.hidden, config.search_windows)]
    targets = ObservationPoints(ctx, windows)
    reassembled = reassembled_groups(ctx.table) if config.reassembly else set()
    reports: list[LayerReport] = []
    installed: dict[str, torch.Tensor] = {}  # fp32 weight each linear was rounded from
    for index, group in enumerate(ctx.table.sequential):
        members = [n for n in group if n in names]
        if not members:
            continue
        start = time.perf_counter()
        stats = input_stats(ctx, members[0], config.sample_tokens)
        plan, search = None, {}
        if group[0] in reassembled:
            plan, search = _search(config, ctx, members, stats, windows, targets, index)
        if plan is not None and config.fold_scales and members == list(group):
            plan, search["folded_into"] = _fold_divisors(config, ctx, group, plan, installed,
                                                         reports)
        for name in members:
            reports.append(_install(config, ctx, name, plan, stats, search, start, installed))
    return reports


def _fold_divisors(config, ctx, group, plan, installed, reports) -> tuple[Plan, str | None]:
    """Divide the input's producer by ``plan``'s per-channel divisors: the norm feeding
    ``group``, or the rows of the linear producing down's input. Returns the plan to install
    (gather only when folded) and the producer's name (None: kept in the gather)."""
    d = plan.source_divisors(ctx.module(group[0]).in_features).float()
    norm = {linears: norm for norm, linears in ctx.table.norm_feeds}.get(group)
    if norm is not None:
        fold_into_norm(ctx.module(norm), d, ctx.table.norm_gain_offset)
        return plan.gather_only(), norm
    producer = ctx.table.producer_of(group)
    if producer is None:
        return plan, None
    module = ctx.module(producer)
    if not isinstance(module, QuantLinear):  # left in full precision (--ignore)
        scale_rows(module, d)
        return plan.gather_only(), producer
    weight = installed[producer] / d[:, None]
    bias = None if module.bias is None else module.bias / d.to(module.bias.dtype)
    quant = _quantize(config, ctx, producer, weight, bias, module.reassembly, installed)
    for i, report in enumerate(reports):
        if report.name == ctx.full_name(producer):
            reports[i] = dataclasses.replace(report, weight_rel_err=_rel_err(quant, weight))
    return plan.gather_only(), producer


def _search(config, ctx, members, stats, windows, targets, index) -> tuple[Plan | None, dict]:
    """The reassembly with the least error at the next op's output (None: identity wins)."""
    weights = torch.cat([ctx.module(n).weight.detach().float() for n in members])
    width = stats.absmax.numel()
    thetas = threshold_candidates(stats.absmax, int(config.channel_ratio * width),
                                  config.search_steps)
    originals = {n: ctx.module(n) for n in members}
    best: tuple[float, Plan | None] = (float("inf"), None)
    tried = []
    try:
        for theta in thetas:
            plan = build_plan(stats.sample, stats.absmax, weights, theta, config.assemble,
                              config.pair_score)
            for n in members:
                ctx.replace(n, _simulated(config, originals[n], plan))
            err = targets.error(ctx, windows, index)
            tried.append({"theta": theta, "extra": plan.extra, "mse": err})
            if err < best[0]:
                best = (err, plan)
    finally:
        for n, module in originals.items():
            ctx.replace(n, module)
    plan = best[1]
    if plan is not None and plan.extra == 0:
        plan = None
    return plan, {"candidates": tried}


def _simulated(config: QLLMConfig, linear: nn.Linear, plan: Plan) -> nn.Module:
    """The linear as it would be quantized with ``plan`` (packed, as installed)."""
    weight = reassemble_weight(linear.weight, plan) if plan.extra else linear.weight
    return quantized_linear(config, weight, linear.bias, plan.module(linear.in_features)
                            if plan.extra else None)


def _quantize(config, ctx, name, weight, bias, reassembly, installed) -> QuantLinear:
    """Round ``weight`` (fp32 ``[R, C']``) into a QuantLinear and install it as ``name``."""
    quant = quantized_linear(config, weight, bias, reassembly)
    if config.correction:
        quant.keep_calibration_weight(weight)  # fp32 [R, C'] the error correction merges into
    installed[name] = weight
    ctx.replace(name, quant)
    return quant


def _rel_err(quant: QuantLinear, weight: torch.Tensor) -> float:
    return float((quant.dequantized_weight() - weight).norm() / weight.norm().clamp(min=1e-30))


def _install(config, ctx, name, plan, stats, search, start, installed) -> LayerReport:
    linear = ctx.module(name)
    weight = linear.weight.detach().float()
    reassembly = None
    if plan is not None:
        weight = reassemble_weight(weight, plan)
        reassembly = plan.module(linear.in_features)
    quant = _quantize(config, ctx, name, weight, linear.bias, reassembly, installed)
    w_err = _rel_err(quant, weight)
    extra = {
        "activations": _describe(quant.act_quant),
        "input_absmax": stats.amax,
        "theta": None if plan is None else plan.theta,
        "extra_channels": 0 if plan is None else plan.extra,
        "merged_pairs": 0 if plan is None else plan.merged,
        **search,
    }
    seconds = time.perf_counter() - start
    return LayerReport(ctx.full_name(name), quant.bits_per_weight(), w_err, float("nan"),
                       seconds, extra)


def _describe(act: ActQuantizer | None) -> str:
    return "not quantized" if act is None else f"{act.describe()}, simulated"
