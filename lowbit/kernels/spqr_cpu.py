"""CPU fast path for SpQR linears: ``y = x W^T`` straight from the packed buffers.

The input is permuted once into stored column order; the dense part is unpacked and
dequantized group-wise in row tiles that stay in cache (vectorised bit extraction, then
``(q - z) * s`` per group) and multiplied tile by tile; the outliers are one sparse CSR
matmul (``torch.sparse_csr``) added to the result. No fp32 copy of the weight is kept: the only
state cached on the module is the decoded statistics (``2 x R x C / beta1`` floats), the
permutation as int64 and the CSR tensor.

Registered for stored-weight kind ``"spqr"`` with
:func:`lowbit.kernels.dispatch.register_fast_path` when this module is imported (importing
:mod:`lowbit.algorithms` does it).

For bf16 activations a prepared kernel replaces it (:func:`plan_spqr`, registered with
:func:`lowbit.kernels.dispatch.register_planner`): the dense part of a 2-4 bit weight goes
through torch's int4pack op (:mod:`lowbit.kernels.int4_cpu`; SpQR's 16-column groups each fill
half of a 32-column op group) and the outliers are added by one fp32 sparse CSR matmul
(:class:`SparseAdd`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from math import gcd

import torch
from torch import nn

from lowbit.kernels import dispatch
from lowbit.kernels import triton as triton_kernels
from lowbit.kernels.int4_cpu import Int4Linear, build_int4

TILE_WEIGHTS = 1 << 18  # weights dequantized per tile (int32 codes + fp32 values: 2 MiB)


@dataclass
class _Prepared:
    key: tuple
    scale: torch.Tensor  # fp32 [R, n]
    zero: torch.Tensor  # fp32 [R, n]
    perm: torch.Tensor | None  # int64 [C]
    outliers: torch.Tensor | None  # sparse CSR fp32 [R, C] (stored column order)
    tile_rows: int


def unpack_rows(packed: torch.Tensor, bits: int, rows: int, cols: int) -> torch.Tensor:
    """Codes ``[rows, cols]`` (int32) from a densely packed buffer that starts on a row.

    ``packed`` holds exactly the bytes of ``rows * cols`` codes (``rows * cols % 8 == 0``
    unless it is the buffer's tail) in :func:`lowbit.formats.packing.pack_codes` layout.
    """
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # whole codes per byte (1, 2, 4, 8 bits)
        shifts = torch.arange(0, 8, bits, dtype=torch.int32)
        codes = (packed.to(torch.int32)[:, None] >> shifts) & mask
    else:  # 8 codes in `bits` bytes: assemble the little-endian word, then shift out
        wide = torch.int32 if bits <= 3 else torch.int64
        chunks = packed.view(-1, bits).to(wide)
        word = chunks[:, 0]
        for i in range(1, bits):
            word = word | (chunks[:, i] << (8 * i))
        shifts = torch.arange(0, 8 * bits, bits, dtype=wide)
        codes = (word[:, None] >> shifts) & mask
    return codes.reshape(-1)[: rows * cols].to(torch.int32).view(rows, cols)


def _prepare(module: torch.nn.Module) -> _Prepared:
    key = (module.qweight.data_ptr(), module.outlier_values.data_ptr(), module.qweight.device)
    cached = getattr(module, "_spqr_cpu", None)
    if cached is not None and cached.key == key:
        return cached
    stored = module.stored_weight()
    scale, zero = stored.statistics()
    rows, cols = stored.out_features, stored.in_features
    outliers = None
    if stored.outlier_count:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            outliers = torch.sparse_csr_tensor(
                stored.outlier_rowptr,
                stored.outlier_cols.to(torch.int32),
                stored.outlier_values.float(),
                (rows, cols),
                check_invariants=True,
            )
    align = 8 // gcd(cols, 8)  # tiles must start on a byte-aligned chunk of 8 codes
    tile_rows = max(align, TILE_WEIGHTS // cols // align * align)
    perm = None if stored.perm is None else stored.perm.long()
    prepared = _Prepared(key, scale, zero, perm, outliers, tile_rows)
    module._spqr_cpu = prepared
    return prepared


def dequantize_tile(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, beta1: int
) -> torch.Tensor:
    """fp32 ``[r, C]`` = ``s * (q - z)`` group-wise for codes ``[r, C]``, stats ``[r, n]``."""
    r, cols = codes.shape
    if cols % beta1 == 0:
        n = cols // beta1
        w = codes.view(r, n, beta1) - zero[:, :, None]
        return w.mul_(scale[:, :, None]).view(r, cols)
    s = scale.repeat_interleave(beta1, dim=1)[:, :cols]
    z = zero.repeat_interleave(beta1, dim=1)[:, :cols]
    return (codes - z).mul_(s)


def spqr_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``x [..., C] -> [..., R]`` for a SpQR QuantLinear on CPU; None if it does not apply."""
    if x.device.type != "cpu" or not x.is_floating_point() or x.dtype == torch.float64:
        return None
    prep = _prepare(module)
    meta = module.weight_meta
    rows, cols, bits, beta1 = meta["out_features"], meta["in_features"], meta["bits"], meta["beta1"]
    lead = x.shape[:-1]
    xt = x.reshape(-1, cols).float()
    if prep.perm is not None:
        xt = xt[:, prep.perm]
    xt = xt.t()  # [C, M]
    out = torch.empty(rows, xt.shape[1])
    packed = module.qweight
    for r0 in range(0, rows, prep.tile_rows):
        r1 = min(r0 + prep.tile_rows, rows)
        b0, b1 = r0 * cols * bits // 8, -(-(r1 * cols) // 8) * bits
        codes = unpack_rows(packed[b0:b1], bits, r1 - r0, cols)
        w = dequantize_tile(codes, prep.scale[r0:r1], prep.zero[r0:r1], beta1)
        torch.mm(w, xt, out=out[r0:r1])
    if prep.outliers is not None:
        out += prep.outliers @ xt
    y = out.t()
    if module.bias is not None:
        y = y + module.bias.float()
    return y.reshape(*lead, rows).to(x.dtype)


@torch.library.custom_op("lowbit::csr_add_matmul", mutates_args=())
def csr_add_matmul(
    y: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
    x2: torch.Tensor, rows: int, cols: int,
) -> torch.Tensor:
    """fp32 ``y + x2 S^T`` with ``S`` the CSR matrix ``(crow [N+1], col [nnz], values [nnz])``
    of shape ``[rows, cols]``; ``x2 [M, K]``, ``y [M, N]``.

    A custom op so that ``torch.compile`` treats it as one opaque call: sparse tensors inside a
    compiled graph break it, and the breaks recompile per layer until dynamo gives up.
    """
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(crow, col, values, (rows, cols))
    return y.float() + (csr @ x2.float().t()).t()


@csr_add_matmul.register_fake
def _csr_add_matmul_fake(y, crow, col, values, x2, rows, cols):
    return torch.empty(y.shape, dtype=torch.float32, device=y.device)


class SparseAdd(nn.Module):
    """``y + x S^T`` for the outliers ``S [N, K]`` (input column order), as one fp32 sparse CSR
    matmul (faster than a gather and scatter-add, eager or compiled).

    Buffers (non-persistent): the CSR arrays ``crow [N+1]``, ``col [nnz]`` (int32, checked
    once here) and ``values [nnz]`` fp32.
    """

    def __init__(self, rows: int, cols: int, rowptr: torch.Tensor, col: torch.Tensor,
                 values: torch.Tensor) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            torch.sparse_csr_tensor(
                rowptr.to(torch.int32), col.to(torch.int32), values.float(), (rows, cols),
                check_invariants=True,
            )
        self.register_buffer("crow", rowptr.to(torch.int32), persistent=False)
        self.register_buffer("col", col.to(torch.int32), persistent=False)
        self.register_buffer("values", values.float(), persistent=False)

    def forward(self, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x2 [M, K]``, ``y [M, N]`` -> fp32 ``y + x2 S^T``."""
        return csr_add_matmul(y, self.crow, self.col, self.values, x2, self.rows, self.cols)


class SpQRInt4Linear(nn.Module):
    """SpQR weight as an :class:`~lowbit.kernels.int4_cpu.Int4Linear` (dense part, no bias)
    plus a :class:`SparseAdd` of the outliers (None without outliers) plus the bias."""

    path = "spqr-int4"

    def __init__(self, dense: Int4Linear, sparse: SparseAdd | None, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = dense.in_features, dense.out_features
        self.dense = dense
        self.sparse = sparse
        self.register_buffer("bias", bias, persistent=False)

    def accepts(self, x: torch.Tensor) -> bool:
        return self.dense.accepts(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., C]`` bf16 -> ``[..., R]`` bf16."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = self.dense.matmul(x2)
        if self.sparse is not None:
            y = self.sparse(x2, y).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def plan_spqr(stored, bias: torch.Tensor | None, dtype: torch.dtype) -> SpQRInt4Linear | None:
    """The int4pack kernel for a 2-4 bit SpQR weight and bf16 activations, else None."""
    if dtype != torch.bfloat16 or stored.bits > 4:
        return None
    scale, zero = stored.statistics()
    codes, bits = stored.codes(), stored.bits
    dense = build_int4(codes, bits, scale, zero, stored.beta1, stored.perm, None, dtype)
    if dense is None:
        return None
    sparse = None
    if stored.outlier_count:
        cols, values = stored.outlier_cols.long(), stored.outlier_values
        if stored.perm is not None:  # stored column -> input column, sorted again within rows
            cols = stored.perm.long()[cols]
            order = torch.argsort(stored.outlier_rows() * stored.in_features + cols)
            cols, values = cols[order], values[order]
        sparse = SparseAdd(stored.out_features, stored.in_features, stored.outlier_rowptr, cols,
                           values)
    return SpQRInt4Linear(dense, sparse, None if bias is None else bias.detach().to(dtype))


dispatch.register_fast_path("spqr", spqr_linear)
dispatch.register_planner("spqr", plan_spqr)
# CUDA inputs: the Triton kernels (imported on first use; None without triton)
dispatch.register_fast_path("spqr", triton_kernels.spqr_fast_path)
