"""Triton matmul for group-wise integer weights
(:class:`~lowbit.formats.packed_int.PackedIntWeight`).

``y = x W^T (+ b)`` with ``W[n, k] = s[n, g] * (q[n, k] - z[n, g])``, ``g = k // group``
(a shorter last group when ``group`` does not divide ``K``; ``group = K`` per channel). Each
program owns a ``[BLOCK_M, BLOCK_N]`` tile of ``y`` and one K-split; per ``BLOCK_K`` step it
unpacks its ``[BLOCK_N, BLOCK_K]`` codes from the bit stream (int32 word loads when
``K % 32 == 0``, see :mod:`.common`) and ``tl.dot``s them with the input tile: fp16/bf16
inputs multiply in their own dtype with fp32 accumulation, fp32 inputs in IEEE fp32.
When the tile lies in one group (``group`` a multiple of ``BLOCK_K``, or one group per row)
the dot takes the raw codes (exact in fp16/bf16) and the statistics are applied to the
``[BLOCK_M, BLOCK_N]`` partial sums in fp32: ``s * (x.q - z * sum(x))``, so each thread loads
only the statistics of its accumulator columns; otherwise each weight is dequantized before
the dot.

Zero points: symmetric grids use the fixed mid code ``2**(bits-1)``; asymmetric ones read
packed integer codes (a ``bits``-wide stream over ``[N, n_groups]``) or fp16 values. The
act-order permutation is applied to the input once, on the host (codes are stored in that
order, so groups stay contiguous).
Imported lazily (this module imports triton); tested on CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton.common import (
    check_size,
    dot_nt,
    gather_codes,
    launch_plan,
    output_buffer,
    store_tile,
    word_codes,
    word_view,
)

ZERO_SYMMETRIC, ZERO_CODES, ZERO_FLOAT = 0, 1, 2


@triton.jit
def _zero(z_ptr, idx, mask, BITS: tl.constexpr, ZERO_MODE: tl.constexpr):
    """fp32 zero points at statistic indices ``idx`` (any shape)."""
    if ZERO_MODE == 0:
        z = tl.full(idx.shape, 1 << (BITS - 1), tl.float32)
    elif ZERO_MODE == 1:
        z = gather_codes(z_ptr, idx, BITS, mask).to(tl.float32)
    else:
        z = tl.load(z_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    return z


@triton.jit
def _int_kernel(
    x_ptr,
    y_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    M,
    N,
    K,
    group,
    n_groups,
    k_split,
    ksplit_words,
    row_words,
    stride_xm,
    stride_ym,
    BITS: tl.constexpr,
    ZERO_MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WORDS: tl.constexpr,
    GROUP_TILE: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pid_k = tl.program_id(2)
    n_mask = rn < N
    m_mask = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_split
    kw_lo = pid_k * ksplit_words  # = k_split * BITS / 32 when WORDS
    for i in range(0, tl.cdiv(tl.minimum(k_split, K - k_lo), BLOCK_K)):
        k0 = k_lo + i * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = n_mask[:, None] & k_mask[None, :]
        if WORDS:
            kw = kw_lo + i * (BLOCK_K // 32 * BITS)
            q = word_codes(qw_ptr, rn, n_mask, row_words, kw, BITS, BLOCK_N, BLOCK_K)
        else:
            q = gather_codes(qw_ptr, rn[:, None] * K + rk[None, :], BITS, w_mask)
        if GROUP_TILE:  # one group per tile: s * (x.q - z * sum(x)) on the partial sums
            idx = rn * n_groups + k0 // group
            s = tl.load(s_ptr + idx, mask=n_mask, other=0.0).to(tl.float32)
            z = _zero(z_ptr, idx, n_mask, BITS, ZERO_MODE)
            xsum = tl.sum(x.to(tl.float32), axis=1)
            part = dot_nt(x, q, IEEE)
            acc += (part - xsum[:, None] * z[None, :]) * s[None, :]
        else:
            idx = rn[:, None] * n_groups + (rk // group)[None, :]
            s = tl.load(s_ptr + idx, mask=w_mask, other=0.0).to(tl.float32)
            z = _zero(z_ptr, idx, w_mask, BITS, ZERO_MODE)
            w = s * (q.to(tl.float32) - z)
            acc += dot_nt(x, w, IEEE)
    store_tile(acc, y_ptr, b_ptr, rm, rn, m_mask, n_mask, pid_k, stride_ym, HAS_BIAS, SPLIT_K)


def int_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group: int,
    bias: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """``x [M, K]`` (stored column order; fp16/bf16/fp32) times ``W^T`` (+ ``bias``).

    Args:
        qweight: uint8 packed ``bits``-bit codes of ``W`` ``[N, K]`` (row-major stream).
        scales: fp16 ``[N, n_groups]``, ``n_groups = ceil(K / group)``.
        zeros: None (symmetric), uint8 packed ``bits``-bit codes of ``[N, n_groups]``, or fp16
            ``[N, n_groups]``.
        group: columns per group (``K`` for one group per row).
        bias: ``[N]`` or None.
        block_n, block_k, split_k: override :func:`~.common.launch_plan` (tests).
    Returns:
        ``[M, N]`` in ``x.dtype`` (fp32 accumulation).
    """
    grid, args, consts = int_launch(x, qweight, scales, zeros, bits, group, bias, block_n,
                                    block_k, split_k)
    _int_kernel[grid](*args, **consts)
    return args[1].to(x.dtype)


def int_launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group: int,
    bias: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
) -> tuple[tuple[int, int, int], tuple, dict]:
    """``(grid, args, constexprs)`` of the :func:`int_matmul` launch (``args[1]`` is the output
    buffer); works on ``meta`` tensors, for :mod:`lowbit.kernels.triton.aot`."""
    m, k = x.shape
    n, n_groups = scales.shape
    if n_groups != -(-k // group):
        raise ValueError(f"scales have {n_groups} groups, expected ceil({k} / {group})")
    check_size(n, k)
    x = x.contiguous()
    plan = launch_plan(m, n, k, x.device, group, block_n, block_k, split_k, x.dtype)
    words = word_view(qweight, k, bits, plan.block_k)
    if zeros is None:
        zero_mode = ZERO_SYMMETRIC
    else:
        zero_mode = ZERO_CODES if zeros.dtype == torch.uint8 else ZERO_FLOAT
    y = output_buffer(m, n, x, plan)
    args = (
        x,
        y,
        qweight if words is None else words,
        scales,
        scales if zeros is None else zeros,
        scales if bias is None else bias,
        m,
        n,
        k,
        group,
        n_groups,
        plan.k_split,
        plan.k_split * bits // 32,
        k * bits // 32,
        x.stride(0),
        y.stride(0),
    )
    consts = dict(
        BITS=bits,
        ZERO_MODE=zero_mode,
        HAS_BIAS=bias is not None,
        WORDS=words is not None,
        GROUP_TILE=n_groups == 1 or group % plan.block_k == 0,
        SPLIT_K=plan.split_k,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        IEEE=x.dtype == torch.float32,
    )
    return plan.grid(m, n), args, consts
