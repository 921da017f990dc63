"""The fallback fast path: the stored weight dequantized once into the activation dtype (bf16 or
fp16), kept as a non-persistent buffer and multiplied densely.

For formats the integer ops cannot hold (block-scaled FP4/FP8, groups of 5-8 bits, group sizes
that are not multiples of 32 other than 16). It costs ``2 x R x C`` bytes (half of the fp32
reference's cached weight, which it replaces) and streams like a bf16 model.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.kernels.dispatch import Kernel

REDUCED = (torch.bfloat16, torch.float16)  # the activation dtypes this path takes


class DenseLinear(Kernel):
    """``y = x W^T + b`` with ``W`` ``[N, K]`` held in the activation dtype (input column order).

    Buffers (non-persistent): ``weight`` ``[N, K]``, ``bias`` ``[N]`` or None.
    """

    path = "dense"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def accepts(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype == self.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``."""
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, {self.weight.dtype}"


def build_dense(stored, bias: torch.Tensor | None, dtype: torch.dtype) -> DenseLinear:
    """Dequantize ``stored`` (any stored weight: fp32 ``[R, C]`` in input order) into ``dtype``."""
    weight = stored.dequantize().to(dtype).contiguous()
    return DenseLinear(weight, None if bias is None else bias.detach().to(dtype))
