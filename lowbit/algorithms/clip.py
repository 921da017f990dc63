"""Clip: round to nearest on a min-max grid whose range is shrunk, per group, to the factor that
minimises the calibration-weighted squared error.

The range search of GPTQ's reference quantizer (``find_params`` with ``mse=True``: shrink
``[min, max]`` by ``p = 1, 1 - 1/n, ..., 1 - max_shrink`` and keep each group's best ``p``),
scored as AWQ's clip search scores it, by the error on the calibration inputs, here in its
diagonal form: a group's error is ``sum_j H_jj (w_j - q_j)^2`` over its columns ``j``, with
``H = (2/N) sum x x^T`` the layer's input Hessian. ``p = 1`` (plain RTN) is a candidate and a
shrink replaces it only when strictly better, so the weighted error is never above RTN's. The
result is stored as RTN's is (:class:`~lowbit.formats.packed_int.PackedIntWeight`), so it saves,
reloads, runs on every kernel and exports as RTN does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.algorithms.linearwise import Solution, quantize_linearwise
from lowbit.algorithms.weight_config import IntWeightConfig
from lowbit.core.config import option
from lowbit.core.method import register
from lowbit.core.report import LayerReport
from lowbit.errors import LowbitError
from lowbit.formats.intq import IntGrid, minmax_params, pad_to_groups, quantize
from lowbit.formats.packed_int import PackedIntWeight


@dataclass(frozen=True)
class ClipConfig(IntWeightConfig):
    """RTN with a per-group clipping range searched on the calibration data."""

    method = "clip"
    max_shrink: float = option(0.8, "largest fraction of a group's min-max range cut off "
                                    "(0.8: the range may shrink to 0.2 of it)")
    grid_points: int = option(100, "shrink factors tried per group: p = 1 - i / grid_points")
    true_sequential: bool = option(True, "collect each sequential group's Hessians after the "
                                         "previous group is quantized")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.max_shrink < 1:
            raise LowbitError(f"--max-shrink must be in [0, 1), got {self.max_shrink}")
        if self.grid_points < 1:
            raise LowbitError(f"--grid-points must be >= 1, got {self.grid_points}")


def clip_params(
    w: torch.Tensor, column_weight: torch.Tensor, grid: IntGrid, max_shrink: float, points: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group scale and zero of ``w`` ``[R, C]`` minimising the ``column_weight``-weighted
    squared error (``column_weight`` ``[C]`` >= 0, e.g. diag(H)).

    Returns fp32 ``scale``, ``zero`` and the kept fraction ``p`` of the range, each
    ``[R, n_groups]`` (scales fp16-representable, zeros codes for asymmetric grids, as
    :func:`~lowbit.formats.intq.minmax_params` gives them).
    """
    rows, cols = w.shape
    group = grid.group_width(cols)
    grouped, _ = pad_to_groups(w.float(), group)  # [R, n, g]; padding repeats the last column
    weight = torch.zeros(grouped.shape[1] * group, device=w.device)
    weight[:cols] = column_weight.float()  # padding weighs nothing
    weight = weight.view(1, -1, group)
    best_scale, best_zero = minmax_params(grouped, grid.bits, grid.symmetric, grid.round_zero)
    best_err = _weighted_error(grouped, best_scale, best_zero, weight, grid.bits)
    kept = torch.ones_like(best_err)
    for i in range(1, int(max_shrink * points) + 1):
        scale, zero = minmax_params(
            grouped * (1 - i / points), grid.bits, grid.symmetric, grid.round_zero
        )
        err = _weighted_error(grouped, scale, zero, weight, grid.bits)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        kept = torch.where(better, 1 - i / points, kept)
    return best_scale.squeeze(-1), best_zero.squeeze(-1), kept.squeeze(-1)


def _weighted_error(
    grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, weight: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """``sum_j weight_j (w_j - q_j)^2`` per group: ``[R, n, 1]`` for ``grouped`` ``[R, n, g]``."""
    q = (quantize(grouped, scale, zero, bits) - zero) * scale
    return ((q - grouped).square() * weight).sum(dim=-1, keepdim=True)


def clip_solve(config: ClipConfig, weight: torch.Tensor, hessian: torch.Tensor) -> Solution:
    """Quantize one linear's ``weight`` ``[R, C]`` given its Hessian ``[C, C]``."""
    w = weight.detach().float()
    grid = config.grid
    scale, zero, kept = clip_params(
        w, torch.diag(hessian), grid, config.max_shrink, config.grid_points
    )
    group = grid.group_width(w.shape[1])
    grouped, cols = pad_to_groups(w, group)
    codes = quantize(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), grid.bits)
    codes = codes.reshape(w.shape[0], -1)[:, :cols].to(torch.uint8)
    extra = {
        "mean_range_kept": float(kept.mean()),
        "clipped_groups": float((kept < 1).float().mean()),
    }
    return Solution(PackedIntWeight.from_codes(codes, scale, zero, grid), extra)


@register(ClipConfig, "RTN with per-group clipping searched on calibration data", distributed=True)
def apply_block(config: ClipConfig, ctx) -> list[LayerReport]:
    return quantize_linearwise(ctx, config, clip_solve, config.true_sequential)
