"""Triton SpQR matmul: ``y = x W^T`` with W decoded tile by tile from the packed buffers.

Two kernels: a dense one (each program owns a ``[BLOCK_M, BLOCK_N]`` tile of ``y`` and walks K
in ``BLOCK_K`` steps, decoding the ``b``-bit codes and the bilevel statistics of its weight tile
straight from the packed bit streams, ``w = s * (q - z)``, then ``tl.dot``), and an outlier one
(one program per output row and ``BLOCK_M`` inputs adds ``sum_j value_j * x[:, col_j]`` over
the row's CSR entries). The input is permuted into stored column order once, on the host.

Packed buffers are little-endian bit streams (:func:`lowbit.formats.packing.pack_codes`: code
``i`` sits at bits ``[i*b, (i+1)*b)``), so a code spans at most two bytes.
Imported lazily (this module imports triton); tested on CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _code(ptr, idx, BITS: tl.constexpr, mask):
    """``BITS``-bit codes at flat indices ``idx`` (int64) of a packed bit stream."""
    bit = idx * BITS
    byte = bit // 8
    off = (bit % 8).to(tl.int32)
    lo = tl.load(ptr + byte, mask=mask, other=0).to(tl.int32)
    hi = tl.load(ptr + byte + 1, mask=mask & (off + BITS > 8), other=0).to(tl.int32)
    return ((lo | (hi << 8)) >> off) & ((1 << BITS) - 1)


@triton.jit
def _stat(q_ptr, s2_ptr, z2_ptr, row, grp, n_groups, BITS: tl.constexpr, BETA2: tl.constexpr, mask):
    """Dequantized bilevel statistic ``s2 * (q - z2)`` (fp32) of rows ``row``, groups ``grp``."""
    q = _code(q_ptr, row * n_groups + grp, BITS, mask).to(tl.float32)
    second = (row // BETA2) * n_groups + grp
    s2 = tl.load(s2_ptr + second, mask=mask, other=0.0).to(tl.float32)
    z2 = tl.load(z2_ptr + second, mask=mask, other=0.0).to(tl.float32)
    return s2 * (q - z2)


@triton.jit
def _dense_kernel(
    x_ptr,
    y_ptr,
    qw_ptr,
    sq_ptr,
    ss_ptr,
    sz_ptr,
    zq_ptr,
    zs_ptr,
    zz_ptr,
    M,
    N,
    K,
    n_groups,
    stride_xm,
    stride_ym,
    BITS: tl.constexpr,
    SBITS: tl.constexpr,
    ZBITS: tl.constexpr,
    BETA1: tl.constexpr,
    BETA2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        x_mask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=x_mask, other=0.0)
        w_mask = (rn[:, None] < N) & (rk[None, :] < K)
        q = _code(qw_ptr, rn[:, None] * K + rk[None, :], BITS, w_mask).to(tl.float32)
        row, grp = rn[:, None], (rk // BETA1)[None, :]
        s = _stat(sq_ptr, ss_ptr, sz_ptr, row, grp, n_groups, SBITS, BETA2, w_mask)
        z = _stat(zq_ptr, zs_ptr, zz_ptr, row, grp, n_groups, ZBITS, BETA2, w_mask)
        w = tl.where(w_mask, s * (q - z), 0.0)
        if IEEE:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w).to(x.dtype))
    y_mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=y_mask)


@triton.jit
def _outlier_kernel(
    x_ptr, y_ptr, rowptr_ptr, cols_ptr, vals_ptr, M, stride_xm, stride_ym, BLOCK_M: tl.constexpr
):
    n = tl.program_id(0)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    start = tl.load(rowptr_ptr + n)
    end = tl.load(rowptr_ptr + n + 1)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j in range(start, end):
        col = tl.load(cols_ptr + j).to(tl.int64)
        val = tl.load(vals_ptr + j).to(tl.float32)
        xv = tl.load(x_ptr + rm * stride_xm + col, mask=m_mask, other=0.0).to(tl.float32)
        acc += val * xv
    y = tl.load(y_ptr + rm * stride_ym + n, mask=m_mask, other=0.0)
    tl.store(y_ptr + rm * stride_ym + n, y + acc, mask=m_mask)


def spqr_matmul(
    x: torch.Tensor,
    meta: dict,
    tensors: dict[str, torch.Tensor],
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """``x [M, K]`` (stored column order, fp16/bf16/fp32) times the SpQR weight's transpose.

    Args:
        meta, tensors: a :class:`~lowbit.formats.spqr_weight.SpQRWeight`'s ``meta()`` and
            ``tensors()`` on the same device as ``x``.
    Returns:
        fp32 ``[M, N]``. fp32 inputs use IEEE fp32 dot products; fp16/bf16 inputs multiply in
        their own precision with fp32 accumulation.
    """
    m, k = x.shape
    n, beta1 = meta["out_features"], meta["beta1"]
    n_groups = -(-k // beta1)
    x = x.contiguous()
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    t = tensors
    _dense_kernel[grid](
        x,
        y,
        t["qweight"],
        t["scale_q"],
        t["scale_s2"],
        t["scale_z2"],
        t["zero_q"],
        t["zero_s2"],
        t["zero_z2"],
        m,
        n,
        k,
        n_groups,
        x.stride(0),
        y.stride(0),
        BITS=meta["bits"],
        SBITS=meta["scale_bits"],
        ZBITS=meta["zero_bits"],
        BETA1=beta1,
        BETA2=meta["beta2"],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32,
    )
    if t["outlier_values"].numel():
        _outlier_kernel[(n, triton.cdiv(m, block_m))](
            x,
            y,
            t["outlier_rowptr"],
            t["outlier_cols"],
            t["outlier_values"],
            m,
            x.stride(0),
            y.stride(0),
            BLOCK_M=block_m,
        )
    return y

