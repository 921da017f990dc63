"""Fixed point in int8 for values of a signed b-bit integer grid (LR-QAT's downcast phi).

A value ``x`` on the real line near the grid ``[-2**(b-1), 2**(b-1) - 1]`` is clamped to that
range and kept with ``8 - b`` fractional bits: ``q = round(clamp(x) * 2**(8-b))`` in int8 (Q4.4
for 4-bit grids: 4 integer bits, 4 fractional; Q3.5 for 3 bits). The clamped range times
``2**(8-b)`` is ``[-128, 128 - 2**(8-b)]``, so every code fits int8 and decoding
``q / 2**(8-b)`` is exact in fp32/bf16.
"""

from __future__ import annotations

import torch


def grid_range(bits: int) -> tuple[int, int]:
    """``(qmin, qmax)`` of the signed b-bit grid: ``(-2**(b-1), 2**(b-1) - 1)``."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def fraction_bits(bits: int) -> int:
    """Fractional bits of the int8 fixed point for a b-bit grid (``8 - b``; 2 <= b <= 7)."""
    if not 2 <= bits <= 7:
        raise ValueError(
            f"int8 fixed point keeps 8 - bits fractional bits and needs 2 <= bits <= 7, got {bits}"
        )
    return 8 - bits


def to_fixed_point8(x: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes of ``x`` (any shape, float) clamped to the b-bit grid's range."""
    qmin, qmax = grid_range(bits)
    scaled = torch.clamp(x.float(), qmin, qmax) * float(1 << fraction_bits(bits))
    return torch.round(scaled).to(torch.int8)


def from_fixed_point8(q: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 values ``q / 2**(8-b)`` of int8 codes ``q`` (exact)."""
    return q * (1.0 / (1 << fraction_bits(bits)))  # int8 * float -> fp32 in one pass
