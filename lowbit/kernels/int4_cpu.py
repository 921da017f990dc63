"""CPU int4 group-wise matmul with torch's int4pack op, for integer codes of 2 to 4 bits.

torch 2.13 multiplies bf16 activations by a packed 4-bit matrix in one streaming kernel:
``torch.ops.aten._convert_weight_to_int4pack_for_cpu(q [N, K] int32 in 0..15, 2)`` packs, and
``torch.ops.aten._weight_int4pack_mm_for_cpu(x [M, K], packed, g, sz [K/g, N, 2])`` computes
``x W^T`` with ``W[n, k] = (q[n, k] - 8) * sz[k//g, n, 0] + sz[k//g, n, 1]``. It needs
``g`` in {32, 64, 128, 256}, ``K`` a multiple of ``g`` and ``N`` a multiple of 16, and is fast
only for bf16 activations (fp32 and fp16 take a slow path).

lowbit's integer weights are ``s * (q - z)`` per group of ``G`` *stored* columns (the act-order
permutation, if any, puts input column ``perm[j]`` at stored column ``j``). A ``b``-bit code
(``b <= 4``) is shifted to centre on the op's 8, ``q' = q + 8 - c`` with ``c = 2**(b-1)``, and
``s * (q - z) = (q' - 8) * s + s * (c - z)``: the op's zero is ``s * (c - z)`` (small for
near-symmetric grids, so rounding it to bf16 costs little). Columns are mapped onto the op's
layout by :func:`layout_for`:

- ``direct``: ``G`` a multiple of an op group ``g`` (each lowbit group is ``G / g`` op groups
  with the same statistics; a ragged last group is fine), or one group per row; ``g`` is the
  candidate that reads the fewest bytes (codes plus statistics, padding included);
- ``padded``: ``G = 16`` (SpQR's default): each 16-column group fills the first half of a 32-column
  op group whose other half multiplies zeros (8 bits read per weight instead of 4).

The input is gathered once per call into the op's column order (the permutation and padding
folded into one index), rows are padded to 16 with zero weights and sliced off. Statistics are
rounded to bf16 (the op's dtype): that and the bf16 activations are the whole difference from
the fp32 reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.kernels.dispatch import Kernel

OP_GROUPS = (256, 128, 64, 32)
ROW_ALIGN = 16
MID_CODE = 8


@dataclass(frozen=True)
class Int4Layout:
    """Placement of ``cols`` stored columns (groups of ``group``) on the op's columns.

    Attributes:
        op_group: the op's group size ``g``.
        op_cols: the op's ``K`` (a multiple of ``op_group``).
        padded: every stored group starts its own op group (``group < op_group``).
    """

    cols: int
    group: int
    op_group: int
    op_cols: int
    padded: bool

    def op_column(self) -> torch.Tensor:
        """int64 ``[cols]``: the op column of each stored column."""
        c = torch.arange(self.cols)
        if not self.padded:
            return c
        return c // self.group * self.op_group + c % self.group

    def op_group_owner(self) -> torch.Tensor:
        """int64 ``[op_cols / op_group]``: the lowbit group whose statistics each op group uses."""
        i = torch.arange(self.op_cols // self.op_group)
        if self.padded:
            return i
        n = -(-self.cols // self.group)
        return (i * self.op_group // self.group).clamp(max=n - 1)


def layout_for(cols: int, group: int) -> Int4Layout | None:
    """The op layout for ``cols`` stored columns in groups of ``group`` (``group >= cols``: one
    group per row), or None when the op cannot hold these groups."""
    group = min(group, cols)
    fits = [g for g in OP_GROUPS if group % g == 0 or group == cols]
    if fits:  # the op group that reads the fewest bytes per row: codes plus bf16 statistics
        g = min(fits, key=lambda g: (_row_bytes(cols, g), -g))
        return Int4Layout(cols, group, g, -(-cols // g) * g, False)
    if group == 16:
        n = -(-cols // group)
        return Int4Layout(cols, group, 32, n * 32, True)
    return None


def _row_bytes(cols: int, op_group: int) -> int:
    op_cols = -(-cols // op_group) * op_group
    return op_cols // 2 + 4 * (op_cols // op_group)


class Int4Linear(Kernel):
    """``y = x W^T + b`` through the int4pack op (bf16 activations on CPU).

    Buffers (non-persistent: derived from the stored weight, never saved):
        packed: the op's packed codes for ``[N_pad, K_op]``.
        scales_and_zeros: bf16 ``[K_op / g, N_pad, 2]``.
        gather: int64 ``[K_op]`` input column feeding each op column (``in_features`` = a zero
            column), or None when the input is used as is (then ``pad`` zero columns follow).
        bias: bf16 ``[N]`` or None.
    """

    path = "int4"

    def __init__(
        self,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        layout: Int4Layout,
        gather: torch.Tensor | None,
        out_features: int,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.in_features = layout.cols
        self.out_features = out_features
        self.op_group = layout.op_group
        self.pad = layout.op_cols - layout.cols
        self.layout = layout
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)
        self.register_buffer("gather", gather, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def accepts(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype == self.scales_and_zeros.dtype

    def op_input(self, x2: torch.Tensor) -> torch.Tensor:
        """``[M, K]`` input -> ``[M, K_op]`` in the op's column order."""
        if self.gather is not None:
            x2 = nn.functional.pad(x2, (0, 1)).index_select(1, self.gather)
        elif self.pad:
            x2 = nn.functional.pad(x2, (0, self.pad))
        return x2.contiguous()

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``[M, K]`` -> ``[M, N]`` without bias."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            self.op_input(x2), self.packed, self.op_group, self.scales_and_zeros
        )
        return y[:, : self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K]`` bf16 -> ``[..., N]`` bf16."""
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        kind = "padded 16->32" if self.layout.padded else "direct"
        return f"{self.in_features}->{self.out_features}, op group {self.op_group} ({kind})"


def build_int4(
    codes: torch.Tensor,
    bits: int,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group: int,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Int4Linear | None:
    """An :class:`Int4Linear` for ``W = s * (q - z)`` group-wise, or None if the op cannot hold it.

    Args:
        codes: ``[R, C]`` integer codes in ``0 .. 2**bits - 1``, stored column order.
        bits: code width, 1..4.
        scale, zero: fp32 ``[R, n]``, one per group of ``group`` stored columns (``n = 1`` with
            ``group >= C`` for per-channel statistics); the last group may be shorter.
        perm: ``[C]`` input column of each stored column, or None.
        bias: ``[R]`` or None.
    """
    rows, cols = codes.shape
    if not 1 <= bits <= 4 or int(codes.max()) >> bits or int(codes.min()) < 0:
        raise ValueError(f"int4 path needs codes of 1-4 bits, got {bits}-bit codes out of range")
    layout = layout_for(cols, group)
    if layout is None:
        return None
    if perm is not None and layout.group == cols:  # one group per row: un-permute the codes
        codes = unpermute_columns(codes, perm)
        perm = None
    rows_pad = -(-rows // ROW_ALIGN) * ROW_ALIGN
    op_cols = layout.op_column()
    # centre b-bit codes on the op's mid code: q' - 8 = q - c, so w = s * (q' - 8) + s * (c - z)
    # keeps both terms small (bf16 rounding of s and of the op's zero then costs least)
    center = 1 << (bits - 1)
    q = torch.full((rows_pad, layout.op_cols), MID_CODE, dtype=torch.int32)
    q[:rows, op_cols] = codes.to(torch.int32) + (MID_CODE - center)
    owner = layout.op_group_owner()
    s = torch.zeros(rows_pad, owner.numel())
    s[:rows] = scale.float()[:, owner]
    z_op = torch.zeros_like(s)
    z_op[:rows] = s[:rows] * (center - zero.float()[:, owner])
    sz = torch.stack([s.t(), z_op.t()], dim=-1).to(dtype).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    gather = None
    if perm is not None or layout.padded:
        gather = torch.full((layout.op_cols,), cols, dtype=torch.int64)
        gather[op_cols] = torch.arange(cols) if perm is None else perm.long()
    b = None if bias is None else bias.detach().to(dtype)
    return Int4Linear(packed, sz, layout, gather, rows, b)


def unpermute_columns(stored: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` in stored column order -> input column order (input column ``perm[j]`` is
    stored column ``j``)."""
    out = torch.empty_like(stored)
    out[:, perm.long()] = stored
    return out
