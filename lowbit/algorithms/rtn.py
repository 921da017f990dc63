"""RTN: round every weight to the nearest point of a min-max grid (the baseline), or of a
llama.cpp block type (llama.cpp's own quantizers, optionally weighted by the calibration
inputs' mean squares like its imatrix)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.algorithms.linearwise import Solution, quantize_linearwise
from lowbit.algorithms.weight_config import BlockFormatConfig
from lowbit.core.config import option
from lowbit.core.method import register
from lowbit.core.report import LayerReport
from lowbit.formats.gguf_blocks import quantize_rows
from lowbit.formats.intq import rtn_quantize
from lowbit.formats.packed_int import PackedIntWeight


@dataclass(frozen=True)
class RTNConfig(BlockFormatConfig):
    """Round-to-nearest weights; see :class:`BlockFormatConfig` for the fields."""

    method = "rtn"
    imatrix: bool = option(False, "gguf weight formats: weight each column's rounding by its "
                                  "calibration inputs' mean square (the Hessian diagonal), as "
                                  "llama.cpp's quantizers use an importance matrix")


def rtn_solve(config: RTNConfig, weight: torch.Tensor, hessian: torch.Tensor) -> Solution:
    if config.gguf_type is not None:
        ggml_type = config.gguf_type_for(weight.shape[1])
        importance = torch.diag(hessian).float() if config.imatrix else None
        return Solution(quantize_rows(weight.detach().float(), ggml_type, importance),
                        {"ggml_type": ggml_type})
    grid = config.grid
    codes, scales, zeros = rtn_quantize(weight.detach().float(), grid)
    return Solution(PackedIntWeight.from_codes(codes, scales, zeros, grid), {})


@register(
    RTNConfig, "round to nearest on a min-max grid (baseline)", distributed=True
)
def apply_block(config: RTNConfig, ctx) -> list[LayerReport]:
    return quantize_linearwise(ctx, config, rtn_solve, true_sequential=False)
