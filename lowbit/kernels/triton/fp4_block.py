"""Triton matmul for block-scaled FP4 E2M1 weights
(:class:`~lowbit.formats.packed_block.PackedBlockWeight` with ``element = "fp4_e2m1"``).

``y = x W^T (+ b)`` with ``W[n, k] = e2m1(c[n, k]) * S[n, k]``, the effective scale of
:meth:`~lowbit.formats.blockscale.BlockScales.effective`, decoded in the kernel from the stored
scales (``scale_kind``):

* ``"float"``: fp32/fp16/bf16 block scales (ZeroQuant-FP "none", ``amax`` rule);
* ``"e8m0"``: E8M0 codes ``2**(c - 127)`` (ZeroQuant-FP M1, MX; with ``row_scales`` the M2
  ratios: ``S = r[n] * 2**k``);
* ``"e4m3"``: FP8 E4M3 codes (NVFP4), divided by the float32 ``tensor_scale`` when present.

Granularity: groups of ``G`` columns (a shorter last group), one block per row (``G = K``) or
one per tensor (row stride 0). Same tiling, code loads, split-K and dot precision as
:mod:`lowbit.kernels.triton.int_group`: E2M1 values are exact in fp16/bf16, so when a tile lies
in one block the dot takes them as they are and the partial sums are scaled in fp32 afterwards.
Imported lazily (this module imports triton); tested on CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.triton.common import (
    check_size,
    dot_nt,
    e2m1_value,
    e4m3_value,
    e8m0_value,
    gather_codes,
    launch_plan,
    output_buffer,
    store_tile,
    word_codes,
    word_view,
)

SCALE_KINDS = {"float": 0, "e8m0": 1, "e4m3": 2}  # scale_kind -> the kernel's SCALE_CODE


@triton.jit
def _scale(s_ptr, r_ptr, t_ptr, idx, rows, mask, SCALE_CODE: tl.constexpr,
           HAS_ROW: tl.constexpr, HAS_TENSOR: tl.constexpr):
    """fp32 effective scales at block indices ``idx`` of rows ``rows`` (same shape)."""
    if SCALE_CODE == 0:
        s = tl.load(s_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        c = tl.load(s_ptr + idx, mask=mask, other=0).to(tl.int32)
        if SCALE_CODE == 1:
            s = e8m0_value(c)
        else:
            s = e4m3_value(c)
    if HAS_ROW:
        s = tl.load(r_ptr + rows, mask=mask, other=0.0).to(tl.float32) * s
    if HAS_TENSOR:
        s = tl.math.div_rn(s, tl.load(t_ptr).to(tl.float32))
    return s


@triton.jit
def _fp4_kernel(
    x_ptr,
    y_ptr,
    qw_ptr,
    s_ptr,
    r_ptr,
    t_ptr,
    b_ptr,
    M,
    N,
    K,
    group,
    s_row_stride,
    k_split,
    ksplit_words,
    row_words,
    stride_xm,
    stride_ym,
    SCALE_CODE: tl.constexpr,
    HAS_ROW: tl.constexpr,
    HAS_TENSOR: tl.constexpr,
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
    kw_lo = pid_k * ksplit_words  # = k_split / 8 (8 codes per word) when WORDS
    for i in range(0, tl.cdiv(tl.minimum(k_split, K - k_lo), BLOCK_K)):
        k0 = k_lo + i * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = n_mask[:, None] & k_mask[None, :]
        if WORDS:
            kw = kw_lo + i * (BLOCK_K // 8)
            c = word_codes(qw_ptr, rn, n_mask, row_words, kw, 4, BLOCK_N, BLOCK_K)
        else:
            c = gather_codes(qw_ptr, rn[:, None] * K + rk[None, :], 4, w_mask)
        v = e2m1_value(c)
        if GROUP_TILE:  # one block per tile: dot the E2M1 values, then scale the partial sums
            idx = rn * s_row_stride + k0 // group
            s = _scale(s_ptr, r_ptr, t_ptr, idx, rn, n_mask, SCALE_CODE, HAS_ROW, HAS_TENSOR)
            part = dot_nt(x, v, IEEE)
            acc += part * tl.where(n_mask, s, 0.0)[None, :]
        else:
            idx = rn[:, None] * s_row_stride + (rk // group)[None, :]
            rows = rn[:, None] + 0 * rk[None, :]
            s = _scale(s_ptr, r_ptr, t_ptr, idx, rows, w_mask, SCALE_CODE, HAS_ROW, HAS_TENSOR)
            w = tl.where(w_mask, v * s, 0.0)
            acc += dot_nt(x, w, IEEE)
    store_tile(acc, y_ptr, b_ptr, rm, rn, m_mask, n_mask, pid_k, stride_ym, HAS_BIAS, SPLIT_K)


def fp4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    out_features: int,
    group_size: int,
    scale_kind: str,
    row_scales: torch.Tensor | None = None,
    tensor_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """``x [M, K]`` (fp16/bf16/fp32) times ``W^T`` (+ ``bias``) for a block-scaled FP4 weight.

    Args:
        qweight: uint8 packed 4-bit E2M1 codes of ``W`` ``[N, K]`` (two per byte, low nibble
            first, row-major stream), ``N = out_features``.
        scales: ``[Rb, nb]`` block scales: fp32/fp16/bf16 (``"float"``) or uint8 codes
            (``"e8m0"``, ``"e4m3"``); ``Rb = N`` (1 per tensor).
        group_size: ``G > 0`` columns per block, ``-1`` one block per row, ``0`` per tensor.
        scale_kind: ``"float"``, ``"e8m0"`` or ``"e4m3"`` (module docstring).
        row_scales: M2 per-row real scales ``[N]`` (fp32/fp16/bf16) or None.
        tensor_scale: float32 ``[1]`` global scale ``g`` (block scales are divided by it).
        bias: ``[N]`` or None.
        block_n, block_k, split_k: override :func:`~.common.launch_plan` (tests).
    Returns:
        ``[M, N]`` in ``x.dtype`` (fp32 accumulation).
    """
    grid, args, consts = fp4_launch(x, qweight, scales, out_features, group_size, scale_kind,
                                    row_scales, tensor_scale, bias, block_n, block_k, split_k)
    _fp4_kernel[grid](*args, **consts)
    return args[1].to(x.dtype)


def fp4_launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    out_features: int,
    group_size: int,
    scale_kind: str,
    row_scales: torch.Tensor | None = None,
    tensor_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
) -> tuple[tuple[int, int, int], tuple, dict]:
    """``(grid, args, constexprs)`` of the :func:`fp4_matmul` launch (``args[1]`` is the output
    buffer); works on ``meta`` tensors, for :mod:`lowbit.kernels.triton.aot`."""
    m, k = x.shape
    n = out_features
    check_size(n, k)
    if group_size > 0:
        group, stride = group_size, scales.shape[1]
    else:  # one block per row (row stride 1) or one for the whole tensor (row stride 0)
        group, stride = k, int(group_size == -1)
    x = x.contiguous()
    plan = launch_plan(m, n, k, x.device, group, block_n, block_k, split_k, x.dtype)
    words = word_view(qweight, k, 4, plan.block_k)
    y = output_buffer(m, n, x, plan)
    args = (
        x,
        y,
        qweight if words is None else words,
        scales,
        scales if row_scales is None else row_scales,
        scales if tensor_scale is None else tensor_scale,
        scales if bias is None else bias,
        m,
        n,
        k,
        group,
        stride,
        plan.k_split,
        plan.k_split // 8,
        k // 8,
        x.stride(0),
        y.stride(0),
    )
    consts = dict(
        SCALE_CODE=SCALE_KINDS[scale_kind],
        HAS_ROW=row_scales is not None,
        HAS_TENSOR=tensor_scale is not None,
        HAS_BIAS=bias is not None,
        WORDS=words is not None,
        GROUP_TILE=group % plan.block_k == 0 or group >= k,
        SPLIT_K=plan.split_k,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        IEEE=x.dtype == torch.float32,
    )
    return plan.grid(m, n), args, consts
