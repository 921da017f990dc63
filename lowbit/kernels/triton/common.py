"""Pieces shared by the Triton kernels for packed weights: code loads from lowbit's bit streams,
small-float decoders, and the launch plan (tile sizes, split-K).

Packed buffers are :func:`lowbit.formats.packing.pack_codes` streams: code ``i`` of a row-major
``[N, K]`` matrix sits at bits ``[i*b, (i+1)*b)``, little-endian. 32 consecutive codes fill
exactly ``b`` 32-bit words, so when ``K % 32 == 0`` every row starts on a word and a tile is
read as int32 words (:func:`word_codes`: vectorised loads of ``32 // b`` codes per word for
b = 2, 4, 8; ``b`` word loads per 32 codes otherwise, a code crossing two words taken from
their 64-bit join); any other ``K`` reads two bytes per code (:func:`gather_codes`).
Offsets are int32: the callers check that ``N * K < 2**31``.

Imported lazily (this module imports triton); tested on CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_CODES = 2**31 - 1  # int32 code indices


@triton.jit
def gather_codes(ptr, idx, BITS: tl.constexpr, mask):
    """int32 ``BITS``-bit codes at flat code indices ``idx`` (int32, any shape) of a packed
    byte stream; 0 where ``mask`` is false. Two byte loads per code when codes can cross
    bytes; indices up to ``2**31`` do not overflow (the bit index is never formed)."""
    byte = (idx >> 3) * BITS + (((idx & 7) * BITS) >> 3)
    off = ((idx & 7) * BITS) & 7
    word = tl.load(ptr + byte, mask=mask, other=0).to(tl.int32)
    if 8 % BITS != 0:
        hi = tl.load(ptr + byte + 1, mask=mask & (off + BITS > 8), other=0).to(tl.int32)
        word = word | (hi << 8)
    return (word >> off) & ((1 << BITS) - 1)


@triton.jit
def word_codes(
    w_ptr, rn, n_mask, row_words, kw, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr
):
    """int32 ``[BLOCK_N, BLOCK_K]`` codes of rows ``rn`` (int32 ``[BLOCK_N]``, valid where
    ``n_mask``) from a packed stream viewed as int32 words, ``row_words = K*BITS/32`` per row
    (``K % 32 == 0``). The tile starts at word ``kw`` of each row (column ``kw*32/BITS``);
    words at or past the row's end read as 0. ``BLOCK_K % 32 == 0``.
    """
    left = row_words - kw  # words left in the row (masks stay constant along 16-word runs)
    if 32 % BITS == 0:  # whole codes per word: contiguous (vectorisable) word loads
        per: tl.constexpr = 32 // BITS
        rw = tl.arange(0, BLOCK_K // per)
        mask = n_mask[:, None] & (rw < left)[None, :]
        w = tl.load(w_ptr + rn[:, None] * row_words + kw + rw[None, :], mask=mask, other=0)
        shift = tl.arange(0, per) * BITS
        codes = (w[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)
    else:  # 32 codes in BITS words; a code crossing words comes from the 64-bit join
        rc = tl.arange(0, BLOCK_K // 32)
        mask = n_mask[:, None] & (rc * BITS < left)[None, :]
        base = w_ptr + rn[:, None] * row_words + kw + rc[None, :] * BITS
        jj = tl.arange(0, 32)
        word_of = (jj * BITS) // 32
        off = ((jj * BITS) % 32).to(tl.int64)
        codes = tl.zeros((BLOCK_N, BLOCK_K // 32, 32), dtype=tl.int32)
        lo = tl.load(base, mask=mask, other=0).to(tl.int64) & 0xFFFFFFFF
        for t in tl.static_range(BITS):
            if t + 1 < BITS:
                hi = tl.load(base + (t + 1), mask=mask, other=0).to(tl.int64) & 0xFFFFFFFF
            else:
                hi = tl.zeros_like(lo)
            pair = lo | (hi << 32)
            part = ((pair[:, :, None] >> off[None, None, :]) & ((1 << BITS) - 1)).to(tl.int32)
            codes = tl.where((word_of == t)[None, None, :], part, codes)
            lo = hi
    return tl.reshape(codes, (BLOCK_N, BLOCK_K))


@triton.jit
def dot_nt(x, w, IEEE: tl.constexpr):
    """fp32 ``x [BM, BK] @ w [BN, BK]^T``: IEEE fp32 when ``IEEE`` (fp32 inputs), else ``w`` in
    ``x``'s dtype (fp16/bf16 tensor cores) with fp32 accumulation."""
    if IEEE:
        out = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    else:
        out = tl.dot(x, tl.trans(w.to(x.dtype)))
    return out


@triton.jit
def store_tile(acc, y_ptr, b_ptr, rm, rn, m_mask, n_mask, pid_k, stride_ym,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Write the fp32 output tile ``acc [BM, BN]`` at rows ``rm``, columns ``rn``: the bias is
    added by the first K-split only; one split stores in ``y``'s dtype, several add atomically
    into the zeroed fp32 output."""
    if HAS_BIAS:
        first = (pid_k == 0).to(tl.float32)
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :] * first
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)


@triton.jit
def e2m1_value(c):
    """fp32 value of FP4 E2M1 codes ``c`` (int32 0..15): sign bit 3, exponent bits 1-2
    (bias 1), mantissa bit 0; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6."""
    e = (c >> 1) & 3
    m = (c & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, (2.0 + m) * (1 << e).to(tl.float32) * 0.25)
    return tl.where(c >= 8, -mag, mag)


@triton.jit
def e8m0_value(c):
    """fp32 ``2**(c - 127)`` of E8M0 codes ``c`` (int32 0..255; 0 -> 2**-127, 255 -> NaN),
    built from its bits (exact, subnormal included)."""
    bits = tl.where(c == 0, 0x00400000, c << 23)
    bits = tl.where(c == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def e4m3_value(c):
    """fp32 value of FP8 E4M3 (``float8_e4m3fn``) codes ``c`` (int32 0..255): bias 7,
    subnormals ``m * 2**-9``, ``0x7F``/``0xFF`` NaN, no infinities (exact)."""
    mag = c & 0x7F
    e = mag >> 3
    m = mag & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    v = tl.where(mag == 0x7F, float("nan"), v)
    return tl.where(c >= 128, -v, v)


DECODERS = {"e2m1": 0, "e8m0": 1, "e4m3": 2}


@triton.jit
def _decode_kernel(c_ptr, out_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.load(c_ptr + idx, mask=idx < n, other=0).to(tl.int32)
    if KIND == 0:
        v = e2m1_value(c)
    elif KIND == 1:
        v = e8m0_value(c)
    else:
        v = e4m3_value(c)
    tl.store(out_ptr + idx, v, mask=idx < n)


def decode_codes(codes: torch.Tensor, kind: str) -> torch.Tensor:
    """fp32 values of uint8 ``codes`` (any shape) exactly as the kernels decode them;
    ``kind`` is ``e2m1`` (low 4 bits), ``e8m0`` or ``e4m3``. For checking the in-kernel
    decoders against the formats layer."""
    flat = codes.reshape(-1).contiguous()
    if kind == "e2m1":
        flat = flat & 15
    out = torch.empty(flat.shape, dtype=torch.float32, device=codes.device)
    _decode_kernel[(triton.cdiv(flat.numel(), 256),)](
        flat, out, flat.numel(), KIND=DECODERS[kind], BLOCK=256
    )
    return out.view(codes.shape)


@dataclass(frozen=True)
class Launch:
    """Tiles and split-K of one matmul ``[M, K] x [K, N]``.

    Attributes:
        block_m, block_n, block_k: tile sizes (``tl.dot`` needs at least 16 each).
        split_k: programs along K (each adds its partial sum into an fp32 output atomically).
        k_split: columns per split (a multiple of ``block_k``).
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    k_split: int

    def grid(self, m: int, n: int) -> tuple[int, int, int]:
        return (triton.cdiv(m, self.block_m), triton.cdiv(n, self.block_n), self.split_k)


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _cuda_multiprocessors(torch.cuda.current_device() if device.index is None
                                 else device.index)


@functools.cache
def _cuda_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_plan(
    m: int,
    n: int,
    k: int,
    device: torch.device,
    group: int,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    dtype: torch.dtype = torch.float16,
) -> Launch:
    """Tile sizes for a small-batch (``m`` 1-16) weight-streaming matmul on ``device``.

    ``block_n`` defaults to 32 and ``block_k`` to the largest of 128, 64, 32 that divides the
    ``group`` width (so a tile lies in one group and the kernel scales after the dot; 64 with
    per-element scales otherwise, e.g. groups of 16); at most 64 for fp32 inputs (``dtype``),
    whose IEEE dot needs more registers. ``split_k`` defaults to enough K-splits
    that about two programs run per multiprocessor while each split keeps at least 4 K-tiles.
    Untuned: chosen from register counts of sm_90 builds, not from timings.
    """
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = block_n or 32
    if block_k is None:
        sizes = (64, 32) if dtype == torch.float32 else (128, 64, 32)
        if group >= k:
            block_k = sizes[0]
        else:
            block_k = next((b for b in sizes if group % b == 0), 64)
    if block_k % 16 or block_n % 16:
        raise ValueError(f"block_n {block_n} and block_k {block_k} must be multiples of 16")
    k_tiles = triton.cdiv(k, block_k)
    if split_k is None:
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        want = triton.cdiv(2 * _multiprocessors(device), tiles)
        split_k = max(1, min(want, k_tiles // 4))
    split_k = max(1, min(split_k, k_tiles))
    k_split = triton.cdiv(k_tiles, split_k) * block_k
    return Launch(block_m, block_n, block_k, triton.cdiv(k, k_split), k_split)


def output_buffer(m: int, n: int, x: torch.Tensor, launch: Launch) -> torch.Tensor:
    """``[m, n]`` output: in ``x.dtype`` when one program owns each tile, else fp32 zeros
    (split-K programs add into it atomically; the caller casts)."""
    if launch.split_k == 1:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    return torch.zeros(m, n, dtype=torch.float32, device=x.device)


def word_view(qweight: torch.Tensor, cols: int, bits: int, block_k: int) -> torch.Tensor | None:
    """``qweight`` (uint8 packed stream of rows of ``cols`` codes) viewed as int32 words when
    :func:`word_codes` can read it (``cols % 32 == 0``, 4-byte aligned, ``block_k % 32 == 0``),
    else None (the kernels then read codes with :func:`gather_codes`)."""
    if cols % 32 or block_k % 32 or not qweight.is_contiguous() or qweight.data_ptr() % 4:
        return None
    return qweight.view(torch.int32)


def check_size(rows: int, cols: int) -> None:
    """The kernels index codes with int32."""
    if rows * cols > MAX_CODES:
        raise ValueError(f"weight [{rows}, {cols}] has more than 2**31 - 1 codes; the Triton "
                         "kernels index with int32 (split the layer or use the reference path)")
