"""Small floating-point element formats (FP8/FP6/FP4) and the E8M0 power-of-two scale format.

Every format here is defined by its bit fields alone: ``FloatFormat(ebits, mbits, bias,
specials)``. Rounding is computed arithmetically in pure torch (no lookup of a reference
library): round to nearest, ties to even, saturating to ``+-max``, NaN kept where the format
has NaN. Codes are the format's own bit patterns (sign bit highest), held in ``uint8``.

``specials`` says which bit patterns are not finite numbers:

* ``"ieee"``: the all-ones exponent is infinity (mantissa 0) or NaN (E5M2).
* ``"fn"``: only the all-ones pattern (exponent and mantissa) is NaN, no infinity
  (OCP E4M3, ``torch.float8_e4m3fn``).
* ``"none"``: every pattern is finite, no NaN and no infinity (OCP FP6/FP4).

Conventions where a format cannot hold the answer (documented in docs/FORMATS.md):

* ``round`` saturates: ``+-inf`` and values beyond ``max`` become ``+-max`` (the OCP
  "saturating" conversion; torch's E5M2 cast instead gives ``inf``).
* ``round`` keeps NaN as NaN even for formats without NaN; ``encode`` then raises, since
  no code can hold it.
* ``round`` keeps the sign of zero (``-0.1 -> -0.0`` on FP4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

_SPECIALS = ("ieee", "fn", "none")


def pow2(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact ``2.0 ** k`` built from bits.

    Args:
        k: integer tensor, any shape; ``[-149, 127]`` for float32, ``[-1074, 1023]`` for float64.
        dtype: ``torch.float32`` or ``torch.float64``.
    Returns:
        ``dtype`` tensor shaped like ``k`` (subnormal results included).
    """
    if dtype == torch.float64:
        itype, mant, ebias, emin = torch.int64, 52, 1023, -1022
    elif dtype == torch.float32:
        itype, mant, ebias, emin = torch.int32, 23, 127, -126
    else:
        raise ValueError(f"pow2 builds float32 or float64, got {dtype}")
    k = k.to(itype)
    if k.numel() and int(k.min()) < emin:  # subnormal results: one set bit in the mantissa
        sub = torch.ones_like(k) << (k - emin + mant).clamp(min=0, max=mant)
        bits = torch.where(k >= emin, (k + ebias).clamp(min=1) << mant, sub)
    else:
        bits = (k + ebias) << mant
    return bits.view(dtype)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _holds(dtype: torch.dtype, max_value: float, min_step: float, mbits: int) -> bool:
    """Whether ``dtype`` represents every value of a format exactly."""
    fi = torch.finfo(dtype)
    return max_value <= fi.max and min_step >= fi.tiny * fi.eps and mbits <= -math.log2(fi.eps)


@dataclass(frozen=True)
class FloatFormat:
    """A sign-magnitude binary floating-point format with ``1 + ebits + mbits`` bits.

    Attributes:
        name: registry name, e.g. ``"fp8_e4m3"``.
        ebits: exponent bits, 1..8.
        mbits: mantissa (fraction) bits, 0..7.
        bias: exponent bias; normal values are ``(1 + m/2**mbits) * 2**(e - bias)``,
            subnormals (exponent field 0) ``m/2**mbits * 2**(1 - bias)``.
        specials: ``"ieee"``, ``"fn"`` or ``"none"`` (module docstring).
    """

    name: str
    ebits: int
    mbits: int
    bias: int
    specials: str

    def __post_init__(self) -> None:
        if not 1 <= self.ebits <= 8 or not 0 <= self.mbits <= 7:
            raise ValueError(f"{self.name}: need 1 <= ebits <= 8 and 0 <= mbits <= 7")
        if self.bits > 8:
            raise ValueError(f"{self.name}: {self.bits} bits; codes are held in one byte (<= 8)")
        if self.specials not in _SPECIALS:
            raise ValueError(f"{self.name}: specials must be one of {_SPECIALS}")
        if self.specials == "fn" and self.mbits == 0:
            raise ValueError(f"{self.name}: 'fn' needs a mantissa bit (all-ones is NaN)")
        if not (self.emin - self.mbits >= -149 and self.max < 2.0**128):
            raise ValueError(f"{self.name}: values must be float32-representable")

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value."""
        return 1 - self.bias

    @property
    def has_nan(self) -> bool:
        return self.specials != "none"

    @property
    def has_inf(self) -> bool:
        return self.specials == "ieee"

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value (``floor(log2(max))``, the MX ``emax_elem``)."""
        top = (1 << self.ebits) - (2 if self.specials == "ieee" else 1)
        return top - self.bias

    @property
    def max(self) -> float:
        """Largest finite value."""
        frac_max = (1 << self.mbits) - (2 if self.specials == "fn" else 1)
        return math.ldexp(1 + frac_max / (1 << self.mbits), self.emax)

    @property
    def min(self) -> float:
        """Most negative finite value (``-max``)."""
        return -self.max

    @property
    def min_positive(self) -> float:
        """Smallest positive value (the smallest subnormal, or normal when ``mbits == 0``)."""
        return math.ldexp(1.0, self.emin - self.mbits)

    def holds(self, dtype: torch.dtype) -> bool:
        """Whether every value of this format is exactly representable in ``dtype``."""
        return _holds(dtype, self.max, self.min_positive, self.mbits)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest representable value, ties to even, saturating to ``+-max``.

        Args:
            x: floating tensor, any shape and float dtype.
        Returns:
            Same shape; ``x.dtype`` when it holds every value of the format, else float32.
            NaN stays NaN; ``+-inf`` saturate to ``+-max``; the sign of zero is kept.
        """
        work = _work_dtype(x)
        xw = x.to(work)
        a = xw.abs().clamp(max=self.max)  # inf -> max; NaN propagates
        _, exp = torch.frexp(a)  # a = m * 2**exp, m in [0.5, 1)
        e = (exp - 1).clamp_(min=self.emin)  # binade; subnormals share emin's spacing
        step = pow2(e.sub_(self.mbits), work)  # ulp of each value's binade
        r = torch.copysign(torch.round(a / step) * step, xw)  # exact scalings by 2**k
        return r.to(x.dtype if self.holds(x.dtype) else work)

    @cached_property
    def _table(self) -> torch.Tensor:
        """float32 ``[2**bits]``: the value of every code (NaN/inf where special)."""
        codes = torch.arange(1 << self.bits, dtype=torch.int64)
        sign = codes >> (self.bits - 1)
        efield = (codes >> self.mbits) & ((1 << self.ebits) - 1)
        mfield = codes & ((1 << self.mbits) - 1)
        frac = mfield.double() / (1 << self.mbits)
        normal = (1 + frac) * torch.pow(2.0, (efield - self.bias).double())
        sub = frac * 2.0**self.emin
        mag = torch.where(efield == 0, sub, normal)
        top = efield == (1 << self.ebits) - 1
        if self.specials == "ieee":
            mag = torch.where(top & (mfield == 0), torch.inf, mag)
            mag = torch.where(top & (mfield != 0), torch.nan, mag)
        elif self.specials == "fn":
            mag = torch.where(top & (mfield == (1 << self.mbits) - 1), torch.nan, mag)
        return torch.where(sign == 1, -mag, mag).float()

    @cached_property
    def _finite_magnitudes(self) -> torch.Tensor:
        """float32 ascending magnitudes of codes ``0, 1, ...`` up to the largest finite code."""
        half = self._table[: 1 << (self.bits - 1)]
        return half[torch.isfinite(half)].contiguous()

    def values(self) -> torch.Tensor:
        """float32 ``[2**bits]``: the value of each code, in code order."""
        return self._table.clone()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of ``round(x)``: uint8, same shape, sign bit ``1 << (bits - 1)``.

        NaN encodes to the all-ones pattern with the input's sign bit (as torch does).
        Raises ValueError on NaN when the format has no NaN.
        """
        r = self.round(x).float()
        nan = torch.isnan(r)
        if not self.has_nan and bool(nan.any()):
            raise ValueError(f"{self.name} has no NaN encoding; the input holds NaN")
        sign = torch.signbit(r).to(torch.int64) << (self.bits - 1)
        idx = torch.searchsorted(self._finite_magnitudes.to(r.device), r.abs().contiguous())
        nan_code = (1 << (self.bits - 1)) - 1
        idx = torch.where(nan, torch.full_like(idx, nan_code), idx)
        return (idx | sign).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 values of uint8/int ``codes`` (any shape)."""
        return self._table.to(codes.device)[_checked_index(codes, self.bits, self.name)]


@dataclass(frozen=True)
class E8M0Format:
    """OCP MX E8M0 scale format: unsigned powers of two ``2**(code - 127)``, code 255 = NaN.

    Exponents ``-127..127``; no zero, no sign, no infinity. Rounding follows the references
    (ml_dtypes ``float8_e8m0fnu`` and ``torch.float8_e8m0fnu``): nearest power of two in the
    linear domain, a tie ``1.5 * 2**k`` rounds *up* to ``2**(k+1)`` (with no mantissa bits
    there is no "even" neighbour in the usual sense). Positive values below ``2**-127``
    become ``2**-127``; values above ``2**127`` and ``+inf`` saturate to ``2**127``;
    zero, negative values and NaN become NaN (no representable value, as in the references).
    """

    name: str = "e8m0"

    bits = 8
    has_nan = True
    has_inf = False
    max = 2.0**127
    min = 2.0**-127
    min_positive = 2.0**-127

    def holds(self, dtype: torch.dtype) -> bool:
        return _holds(dtype, self.max, self.min, 0)

    def exponent(self, x: torch.Tensor) -> torch.Tensor:
        """int64 exponent ``k`` in ``[-127, 127]`` of ``round(x) = 2**k`` (garbage where NaN)."""
        work = _work_dtype(x)
        a = x.to(work).clamp(min=0.0, max=self.max)
        m, exp = torch.frexp(a)  # a = m * 2**exp, m in [0.5, 1)
        k = exp.to(torch.int64) - 1 + (m >= 0.75).to(torch.int64)
        return k.clamp(-127, 127)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest power of two (ties up), saturating; see the class docstring.

        Returns ``x.dtype`` when it holds ``2**-127 .. 2**127`` (float32/64, bfloat16), else
        float32.
        """
        work = _work_dtype(x)
        xw = x.to(work)
        r = pow2(self.exponent(xw), work)
        r = torch.where(xw > 0, r, torch.full_like(r, torch.nan))  # 0, negatives, NaN
        return r.to(x.dtype if self.holds(x.dtype) else work)

    def values(self) -> torch.Tensor:
        """float32 ``[256]``: the value of each code."""
        return self.decode(torch.arange(256))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 biased exponents ``k + 127`` of ``round(x)``; NaN -> 255."""
        xw = x.to(_work_dtype(x))
        codes = self.exponent(xw) + 127
        return torch.where(xw > 0, codes, torch.full_like(codes, 255)).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 ``2**(code - 127)``, NaN for code 255."""
        k = _checked_index(codes, 8, self.name) - 127
        v = pow2(k.clamp(max=127), torch.float32)
        return torch.where(k == 128, torch.full_like(v, torch.nan), v)


def _checked_index(codes: torch.Tensor, bits: int, name: str) -> torch.Tensor:
    idx = codes.to(torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= 1 << bits):
        raise ValueError(f"{name}: codes must lie in [0, {1 << bits}), got out-of-range codes")
    return idx
