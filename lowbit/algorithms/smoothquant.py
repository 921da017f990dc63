"""SmoothQuant (Xiao et al. 2023) as a weight-activation baseline.

For an input shared by a group of linears, per channel ``s_c = max|x_c|^alpha /
max|w_c|^(1 - alpha)`` (``max|w_c|`` over every row reading channel ``c``); the input is divided
by ``s`` and the weight columns multiplied by it, which leaves the output unchanged. The division
is folded into what produces the input: the norm's gain for q/k/v and gate/up, and the rows of
the linear that scales the last group's input (``up_proj`` for ``down_proj``: its input is
``act(gate) * up``; found from the model, ``BlockTable.row_feeds``). Then every linear is rounded to
nearest (:func:`~lowbit.algorithms.wa_quant.quantized_linear`), activations per token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lowbit.algorithms.wa_quant import WAConfig, input_stats, quantized_linear
from lowbit.core.config import option
from lowbit.core.method import register
from lowbit.core.report import LayerReport
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class SmoothQuantConfig(WAConfig):
    """SmoothQuant: the weights and activations of :class:`WAConfig`, after migrating the
    activations' outliers into the weights."""

    method = "smoothquant"
    smooth_alpha: float = option(0.5, "migration strength (0.5 in the paper; 0 = no smoothing)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.smooth_alpha <= 1:
            raise LowbitError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")


def smoothing_scales(absmax: torch.Tensor, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """fp32 ``[C]`` scales for input ``max|x|`` ``[C]`` and weights ``[R, C]`` (all readers)."""
    wmax = weights.detach().float().abs().amax(dim=0).clamp(min=1e-5)
    s = absmax.float().clamp(min=1e-5) ** alpha / wmax ** (1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def fold_into_norm(norm: torch.nn.Module, s: torch.Tensor, offset: float) -> None:
    """Divide the norm's output by ``s`` ``[C]``: ``offset + w  ->  (offset + w) / s``."""
    w = norm.weight
    w.copy_(((offset + w.float()) / s - offset).to(w.dtype))


@torch.no_grad()
def scale_columns(linear: torch.nn.Module, s: torch.Tensor) -> None:
    linear.weight.mul_(s.to(linear.weight.dtype)[None, :])


@torch.no_grad()
def scale_rows(linear: torch.nn.Module, s: torch.Tensor) -> None:
    """Divide output rows (and bias) by ``s`` ``[R]``."""
    linear.weight.div_(s.to(linear.weight.dtype)[:, None])
    if linear.bias is not None:
        linear.bias.div_(s.to(linear.bias.dtype))


def smooth_block(config: SmoothQuantConfig, ctx) -> dict[str, float]:
    """Fold the smoothing of every smoothable input into the block; ``{linear: max s}``."""
    table = ctx.table
    if not table.norm_feeds:
        raise LowbitError(
            "smoothquant folds its scales into the norms feeding a block's linears, and these "
            "blocks have no norm feeds (their norms follow attention and MLP); use "
            "--smooth-alpha 0 (no smoothing) or another method"
        )
    plans = [(norm, linears, False) for norm, linears in table.norm_feeds]
    last = table.sequential[-1]
    source = table.producer_of(last)
    if source is not None:
        plans.append((source, last, True))
    stats = {linears[0]: input_stats(ctx, linears[0], 1).absmax for _src, linears, _ in plans}
    applied = {}
    for source, linears, rows in plans:
        weights = torch.cat([ctx.module(n).weight for n in linears])
        s = smoothing_scales(stats[linears[0]], weights, config.smooth_alpha)
        if rows:
            scale_rows(ctx.module(source), s)
        else:
            fold_into_norm(ctx.module(source), s, table.norm_gain_offset)
        for name in linears:
            scale_columns(ctx.module(name), s)
        applied[linears[0]] = float(s.max())
    return applied


@register(SmoothQuantConfig, "SmoothQuant baseline: smoothing + RTN W/A")
def apply_block(config: SmoothQuantConfig, ctx) -> list[LayerReport]:
    start = time.perf_counter()
    smoothed = smooth_block(config, ctx) if config.smooth_alpha > 0 else {}
    reports = []
    for name in ctx.table.linear_names:
        if config.ignores(ctx.full_name(name)):
            continue
        linear = ctx.module(name)
        weight = linear.weight.detach().float()
        quant = quantized_linear(config, weight, linear.bias)
        w_err = float((quant.dequantized_weight() - weight).norm() / weight.norm())
        ctx.replace(name, quant)
        act = quant.act_quant
        extra = {
            "smooth_alpha": config.smooth_alpha,
            "activations": "not quantized" if act is None else f"{act.describe()}, simulated",
        }
        if name in smoothed:
            extra["max_smoothing_scale"] = smoothed[name]
        reports.append(LayerReport(ctx.full_name(name), quant.bits_per_weight(), w_err,
                                   float("nan"), time.perf_counter() - start, extra))
    return reports
