"""RTN: round every weight to the nearest point of a min-max grid. The baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.algorithms.linearwise import Solution, quantize_linearwise
from lowbit.algorithms.weight_config import IntWeightConfig
from lowbit.core.config import option
from lowbit.core.method import register
from lowbit.core.report import LayerReport
from lowbit.formats.intq import rtn_quantize
from lowbit.formats.packed_int import PackedIntWeight


@dataclass(frozen=True)
class RTNConfig(IntWeightConfig):
    """Round-to-nearest integer weights; see :class:`IntWeightConfig` for the fields, plus
    ``output_error`` (a report only)."""

    method = "rtn"
    output_error: bool = option(False, "collect calibration Hessians to report each layer's "
                                       "output error tr(E H E^T) / tr(W H W^T) (costs a "
                                       "calibration forward per block; the weights are the "
                                       "same)")


def rtn_solve(config: RTNConfig, weight: torch.Tensor, hessian: torch.Tensor | None) -> Solution:
    grid = config.grid
    codes, scales, zeros = rtn_quantize(weight.detach().float(), grid)
    return Solution(PackedIntWeight.from_codes(codes, scales, zeros, grid), {})


@register(
    RTNConfig, "round to nearest on a min-max grid (baseline)", distributed=True,
    calibrated=lambda config: config.output_error,
)
def apply_block(config: RTNConfig, ctx) -> list[LayerReport]:
    """RTN's weights need no activations: no Hessian and no calibration forward unless the
    output error is asked for."""
    return quantize_linearwise(ctx, config, rtn_solve, true_sequential=False,
                               calibrated=config.output_error)
