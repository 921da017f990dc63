"""CPU kernels for SpQR linears, chosen by the planners registered in
:mod:`lowbit.kernels.cpu_paths`.

fp32 activations (:func:`plan_spqr_tiled`, path ``spqr-tiled``): ``y = x W^T`` straight from the
packed buffers. The input is permuted once into stored column order; the dense part is unpacked
and dequantized group-wise in row tiles that stay in cache (vectorised bit extraction, then
``(q - z) * s`` per group) and multiplied tile by tile; the outliers are one sparse CSR matmul
(``torch.sparse_csr``) added to the result. No fp32 copy of the weight is kept: the kernel holds
the decoded statistics (``2 x R x C / beta1`` floats), the permutation as int64 and the CSR
tensor, next to the layer's own packed codes.

bf16 activations (:func:`plan_spqr`, path ``spqr-int4``): the dense part of a 2-4 bit weight
goes through torch's int4pack op (:mod:`lowbit.kernels.int4_cpu`; SpQR's 16-column groups each
fill half of a 32-column op group) and the outliers are added by one fp32 sparse CSR matmul
(:class:`SparseAdd`). Other bf16 and all fp16 weights get the ``dense`` planner.
"""

from __future__ import annotations

import warnings
from math import gcd

import torch
from torch import nn

from lowbit.kernels import dispatch
from lowbit.kernels.dense_cpu import REDUCED
from lowbit.kernels.dispatch import Kernel
from lowbit.kernels.int4_cpu import Int4Linear, build_int4

TILE_WEIGHTS = 1 << 18  # weights dequantized per tile (int32 codes + fp32 values: 2 MiB)


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


class SpQRTiledLinear(Kernel):
    """``y = x W^T + b`` for CPU inputs (any floating dtype but fp64, computed in fp32), the
    dense part decoded from the packed codes in row tiles of ``tile_rows`` rows.

    Buffers (non-persistent): ``qweight`` (the layer's packed codes, shared), ``scale`` and
    ``zero`` fp32 ``[R, n]``, ``perm`` int64 ``[C]`` or None, ``outliers`` sparse CSR fp32
    ``[R, C]`` in stored column order or None, ``bias`` (the layer's) or None.
    """

    path = "spqr-tiled"
    frees_reference_cache = False  # never built it; reference mode may still want it

    def __init__(self, stored, bias: torch.Tensor | None) -> None:
        super().__init__()
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
        self.tile_rows = max(align, TILE_WEIGHTS // cols // align * align)
        self.in_features, self.out_features = cols, rows
        self.bits, self.beta1 = stored.bits, stored.beta1
        perm = None if stored.perm is None else stored.perm.long()
        self.register_buffer("qweight", stored.qweight, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("zero", zero, persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("outliers", outliers, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def accepts(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.is_floating_point() and x.dtype != torch.float64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., C]`` -> ``[..., R]`` in ``x.dtype``."""
        rows, cols, bits = self.out_features, self.in_features, self.bits
        lead = x.shape[:-1]
        xt = x.reshape(-1, cols).float()
        if self.perm is not None:
            xt = xt[:, self.perm]
        xt = xt.t()  # [C, M]
        out = torch.empty(rows, xt.shape[1])
        for r0 in range(0, rows, self.tile_rows):
            r1 = min(r0 + self.tile_rows, rows)
            b0, b1 = r0 * cols * bits // 8, -(-(r1 * cols) // 8) * bits
            codes = unpack_rows(self.qweight[b0:b1], bits, r1 - r0, cols)
            w = dequantize_tile(codes, self.scale[r0:r1], self.zero[r0:r1], self.beta1)
            torch.mm(w, xt, out=out[r0:r1])
        if self.outliers is not None:
            out += self.outliers @ xt
        y = out.t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*lead, rows).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, tiles of {self.tile_rows} rows"


def plan_spqr_tiled(request: dispatch.KernelRequest) -> SpQRTiledLinear | None:
    """The tiled kernel for CPU activations that get no reduced-precision kernel (fp32; not
    fp64, not bf16/fp16, which the ``spqr-int4`` and ``dense`` planners take), else None."""
    dtype = request.dtype
    if (request.device.type != "cpu" or not dtype.is_floating_point or dtype == torch.float64
            or dtype in REDUCED):
        return None
    return SpQRTiledLinear(request.stored, request.bias)


def spqr_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``x [..., C] -> [..., R]`` for a SpQR QuantLinear through a freshly built
    :class:`SpQRTiledLinear` (the layer keeps nothing); None for inputs it does not take
    (not on CPU, fp64). The dispatcher plans the same kernel once per layer."""
    kernel = plan_spqr_tiled(dispatch.request_for(module, torch.float32, x.device))
    return kernel(x) if kernel is not None and kernel.accepts(x) else None


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


class SpQRInt4Linear(Kernel):
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


def plan_spqr(request: dispatch.KernelRequest) -> SpQRInt4Linear | None:
    """The int4pack kernel for a 2-4 bit SpQR weight and bf16 activations, else None."""
    stored, bias = request.stored, request.bias
    if request.dtype != torch.bfloat16 or stored.bits > 4:
        return None
    scale, zero = stored.statistics()
    codes, bits = stored.codes(), stored.bits
    dense = build_int4(codes, bits, scale, zero, stored.beta1, stored.perm, None, request.dtype)
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
    return SpQRInt4Linear(dense, sparse, None if bias is None else bias.detach().to(request.dtype))
