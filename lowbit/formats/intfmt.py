"""Integer element formats and plain torch float dtypes (fp32/fp16/bf16) as formats.

Integer codes follow the GPTQ convention of :mod:`lowbit.formats.intq`: codes are unsigned
``0 .. 2**bits - 1``; a signed value ``v`` in ``[-2**(bits-1), 2**(bits-1) - 1]`` has code
``v + 2**(bits-1)`` (offset binary, the symmetric ``zero`` of ``intq``), an unsigned value is
its own code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.formats.fp import _holds, _work_dtype


@dataclass(frozen=True)
class IntFormat:
    """``int{bits}`` (signed) or ``uint{bits}``: integers, round half to even, saturating.

    Attributes:
        bits: 1..8.
        signed: range ``[-2**(bits-1), 2**(bits-1) - 1]`` vs ``[0, 2**bits - 1]``.
    """

    bits: int
    signed: bool = True

    has_nan = False
    has_inf = False
    min_positive = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"integer formats have 1..8 bits, got {self.bits}")

    @property
    def name(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}"

    @property
    def offset(self) -> int:
        """Code of the value 0."""
        return 1 << (self.bits - 1) if self.signed else 0

    @property
    def max(self) -> float:
        return float((1 << self.bits) - 1 - self.offset)

    @property
    def min(self) -> float:
        return float(-self.offset)

    def holds(self, dtype: torch.dtype) -> bool:
        return _holds(dtype, max(self.max, -self.min), 1.0, self.bits - 1)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest integer (ties to even) clamped to ``[min, max]``; NaN stays NaN.

        Args:
            x: floating tensor, any shape. Returns the same shape and ``x.dtype`` (float32
            for float16 input to formats wider than float16's exact integers, never here).
        """
        work = _work_dtype(x)
        r = torch.round(x.to(work)).clamp(self.min, self.max)
        return r.to(x.dtype if self.holds(x.dtype) else work)

    def values(self) -> torch.Tensor:
        """float32 ``[2**bits]``: the value of each code."""
        return self.decode(torch.arange(1 << self.bits))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 codes ``round(x) + offset``; raises ValueError on NaN."""
        r = self.round(x).float()
        if bool(torch.isnan(r).any()):
            raise ValueError(f"{self.name} has no NaN encoding; the input holds NaN")
        return (r + self.offset).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 ``code - offset``."""
        idx = codes.to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= 1 << self.bits):
            raise ValueError(f"{self.name}: codes must lie in [0, {1 << self.bits})")
        return (idx - self.offset).float()


@dataclass(frozen=True)
class DtypeFormat:
    """A plain torch float dtype used as a (scale) format: ``fp32``, ``fp16``, ``bf16``.

    ``encode`` returns the tensor in that dtype (what is stored), ``decode`` gives float32.
    ``round`` casts with round-to-nearest-even and saturates to ``+-max`` (no overflow to inf).
    """

    name: str
    dtype: torch.dtype

    has_nan = True

    @property
    def bits(self) -> int:
        return torch.finfo(self.dtype).bits

    @property
    def has_inf(self) -> bool:
        return True

    @property
    def max(self) -> float:
        return float(torch.finfo(self.dtype).max)

    @property
    def min(self) -> float:
        return -self.max

    @property
    def min_positive(self) -> float:
        fi = torch.finfo(self.dtype)
        return float(fi.tiny * fi.eps)

    def holds(self, dtype: torch.dtype) -> bool:
        mbits = round(-math.log2(torch.finfo(self.dtype).eps))
        return _holds(dtype, self.max, self.min_positive, mbits)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` cast to the dtype (saturating) and back to ``x.dtype`` (float32 if it cannot
        hold the values)."""
        work = _work_dtype(x)
        r = self.encode(x).to(work)
        return r.to(x.dtype if self.holds(x.dtype) else work)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in ``self.dtype``, saturated to ``+-max``; NaN stays NaN."""
        return x.to(_work_dtype(x)).clamp(self.min, self.max).to(self.dtype)

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        """float32 values of a stored tensor."""
        return stored.float()
