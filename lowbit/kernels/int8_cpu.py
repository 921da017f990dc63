"""CPU int8 per-channel matmul with torch's ``_weight_int8pack_mm``, for 5-8 bit codes with one
group per output row.

``torch.ops.aten._weight_int8pack_mm(x [M, K], w int8 [N, K], s [N])`` computes
``x (w * s[:, None])^T``, fast for bf16 activations. Its input width must be a multiple of 16
(other widths give wrong results or crash), so inputs are zero-padded to ``K_ALIGN``.

A lowbit code ``q`` of ``b <= 8`` bits with zero ``z`` is ``s * (q - z)``
``= s * (q - c) - s * (z - c)`` with ``c = 2**(b-1)``: ``q - c`` fits int8, and the second term
is a per-row offset ``o`` applied as ``- sum_k(x_k) * o`` (exact algebra; computed in fp32).
Symmetric grids have ``z = c``, so no offset. The act-order permutation is undone on the codes
once (one group per row: it does not change the statistics), so the input is used as is.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.kernels.dispatch import Kernel
from lowbit.kernels.int4_cpu import unpermute_columns

K_ALIGN = 32


class Int8Linear(Kernel):
    """``y = x W^T + b`` with ``W = s * w8 - o 1^T`` through the int8pack op.

    Buffers (non-persistent):
        weight: int8 ``[N, K_pad]``, input column order, zero columns past ``K``.
        scales: ``[N]`` in the activation dtype.
        offset: fp32 ``[N]`` or None (symmetric).
        bias: ``[N]`` in the activation dtype, or None.
    """

    path = "int8"

    def __init__(
        self,
        weight: torch.Tensor,
        scales: torch.Tensor,
        offset: torch.Tensor | None,
        in_features: int,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = weight.shape[0]
        self.pad = weight.shape[1] - in_features
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("offset", offset, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def accepts(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype == self.scales.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        xp = nn.functional.pad(x2, (0, self.pad)) if self.pad else x2.contiguous()
        y = torch.ops.aten._weight_int8pack_mm(xp, self.weight, self.scales)
        if self.offset is not None:
            y = (y.float() - x2.float().sum(-1, keepdim=True) * self.offset).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        asym = "asymmetric" if self.offset is not None else "symmetric"
        return f"{self.in_features}->{self.out_features}, per-channel, {asym}"


def build_int8(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Int8Linear:
    """An :class:`Int8Linear` for per-channel ``W = s * (q - z)``.

    Args:
        codes: ``[R, C]`` codes in ``0 .. 2**bits - 1`` (``bits <= 8``), stored column order.
        scale, zero: fp32 ``[R, 1]``.
        perm: ``[C]`` input column of each stored column, or None.
    """
    rows, cols = codes.shape
    if scale.shape != (rows, 1) or zero.shape != (rows, 1):
        raise ValueError(f"int8 path needs one group per row: statistics [{rows}, 1]")
    center = 1 << (bits - 1)
    w8 = codes.to(torch.int16) - center
    if perm is not None:
        w8 = unpermute_columns(w8, perm)
    cols_pad = -(-cols // K_ALIGN) * K_ALIGN
    weight = torch.zeros(rows, cols_pad, dtype=torch.int8)
    weight[:, :cols] = w8.to(torch.int8)
    s = scale.float()[:, 0]
    offset = s * (zero.float()[:, 0] - center)
    offset = None if not offset.any() else offset.contiguous()
    b = None if bias is None else bias.detach().to(dtype)
    return Int8Linear(weight, s.to(dtype), offset, cols, b)
