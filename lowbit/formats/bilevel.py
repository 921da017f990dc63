"""Bilevel statistics (SpQR): a min-max integer format applied to first-level statistics.

First-level statistics ``x [R, n]`` (the scales of ``n`` groups of each of ``R`` rows, or
separately their zero points) are cut along the rows into second-level groups of ``beta2``
consecutive rows (a shorter last group when ``beta2`` does not divide ``R``). Each second-level
group ``[beta2]`` of column ``j`` is quantized asymmetrically to ``bits``-bit codes
``q = clamp(round(x / s + z), 0, 2**bits - 1)``, with ``x ~= s * (q - z)`` and an fp16 scale
``s`` and fp16 (unrounded) zero ``z`` per group, as in SpQR's reference code: the range is the
group's own ``[min, max]`` (not widened to contain 0) and the zero is not rounded. One code path
serves scales and zeros.

Two guards keep the stored fp16 numbers meaningful (SpQR keeps them in fp32 in memory):
``s >= max|x| / 512`` so that ``|z| <= 512 + 2**bits`` stays exact enough in fp16 (this only
binds when a group varies by under ~1.4% of its magnitude at 3 bits, and then bounds the error
by ``max|x| / 1024``), and ``s = 1, z = 0`` for an all-zero group (exact).
Statistics must lie in the fp16 range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.packing import pack_codes, packed_nbytes, unpack_codes

ZERO_BOUND = 512.0


@dataclass(frozen=True)
class BilevelStats:
    """Quantized first-level statistics.

    Attributes:
        codes: uint8 ``[R, n]``, values in ``[0, 2**bits)``.
        scale: fp16 ``[ceil(R / beta2), n]`` second-level scales.
        zero: fp16 ``[ceil(R / beta2), n]`` second-level zero points (real, not rounded).
        bits: code width of the statistics (``b_s``), 1..8.
        beta2: rows per second-level group.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    beta2: int

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8 or self.beta2 < 1:
            raise ValueError(f"need 1 <= bits <= 8 and beta2 >= 1, got {self.bits}, {self.beta2}")
        rows, n = self.codes.shape
        groups = -(-rows // self.beta2)
        for name in ("scale", "zero"):
            t = getattr(self, name)
            if t.dtype != torch.float16 or tuple(t.shape) != (groups, n):
                raise ValueError(f"{name} must be fp16 [{groups}, {n}], got {t.dtype} "
                                 f"{tuple(t.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[R, n]`` statistics ``s * (q - z)``."""
        rows = self.codes.shape[0]
        s = self.scale.float().repeat_interleave(self.beta2, dim=0)[:rows]
        z = self.zero.float().repeat_interleave(self.beta2, dim=0)[:rows]
        return s * (self.codes.float() - z)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Stored tensors: ``{prefix}_q`` (packed codes), ``{prefix}_s2``, ``{prefix}_z2``."""
        return {f"{prefix}_q": pack_codes(self.codes, self.bits), f"{prefix}_s2": self.scale,
                f"{prefix}_z2": self.zero}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, rows: int, n: int,
                     bits: int, beta2: int) -> BilevelStats:
        packed = tensors[f"{prefix}_q"]
        if packed.numel() != packed_nbytes(rows * n, bits):
            raise ValueError(f"{prefix}_q holds {packed.numel()} bytes, expected "
                             f"{packed_nbytes(rows * n, bits)}")
        codes = unpack_codes(packed, bits, rows * n).view(rows, n)
        return cls(codes, tensors[f"{prefix}_s2"], tensors[f"{prefix}_z2"], bits, beta2)


def bilevel_quantize(stats: torch.Tensor, bits: int = 3, beta2: int = 16) -> BilevelStats:
    """Quantize first-level statistics ``stats`` (float ``[R, n]``) in groups of ``beta2`` rows.

    Returns :class:`BilevelStats`; ``.dequantize()`` gives the float32 ``[R, n]`` statistics the
    model must use (in memory equal to what is saved, bit for bit).
    """
    if stats.dim() != 2:
        raise ValueError(f"statistics must be [R, n], got shape {tuple(stats.shape)}")
    if not 1 <= bits <= 8 or beta2 < 1:
        raise ValueError(f"need 1 <= bits <= 8 and beta2 >= 1, got {bits}, {beta2}")
    x = stats.float()
    if not bool(torch.isfinite(x).all()) or float(x.abs().max()) > 65504:
        raise ValueError("statistics must be finite and within the fp16 range (|x| <= 65504)")
    rows, n = x.shape
    pad = (-rows) % beta2
    xp = torch.cat([x, x[-1:].expand(pad, n)]) if pad else x
    groups = xp.view(-1, beta2, n)
    lo, hi = groups.amin(dim=1), groups.amax(dim=1)  # [G2, n]
    maxq = (1 << bits) - 1
    amax = torch.maximum(lo.abs(), hi.abs())
    scale = torch.maximum((hi - lo) / maxq, amax / ZERO_BOUND)
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))
    scale16 = scale.to(torch.float16)
    scale16 = torch.where(scale16 > 0, scale16, torch.full_like(scale16, 2.0**-24))
    zero16 = (-lo / scale16.float()).to(torch.float16)
    s = scale16.float().repeat_interleave(beta2, dim=0)[:rows]
    z = zero16.float().repeat_interleave(beta2, dim=0)[:rows]
    codes = torch.clamp(torch.round(x / s + z), 0, maxq).to(torch.uint8)
    return BilevelStats(codes, scale16, zero16, bits, beta2)
