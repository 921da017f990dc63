"""The registry of element formats: one interface for integers, small floats and scales.

Every format returned by :func:`get_format` has ``.name``, ``.bits``, ``.max``, ``.min``,
``.min_positive``, ``.has_nan``, ``.has_inf``, ``.round(x)`` (nearest representable value,
ties to even, saturating to the range, NaN kept), ``.encode(x)`` (stored codes: uint8 for
formats of at most 8 bits, the dtype itself for ``fp32``/``fp16``/``bf16``) and
``.decode(codes)`` (float32 values).
"""

from __future__ import annotations

from typing import Protocol

import torch

from lowbit.formats.fp import E8M0Format, FloatFormat
from lowbit.formats.intfmt import DtypeFormat, IntFormat


class ElementFormat(Protocol):
    """What every number format offers (see the module docstring)."""

    name: str
    bits: int
    max: float
    min: float
    min_positive: float
    has_nan: bool
    has_inf: bool

    def round(self, x: torch.Tensor) -> torch.Tensor: ...
    def encode(self, x: torch.Tensor) -> torch.Tensor: ...
    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...


def _build() -> dict[str, ElementFormat]:
    formats: list[ElementFormat] = [
        FloatFormat("fp8_e4m3", 4, 3, 7, "fn"),  # OCP E4M3, max 448
        FloatFormat("fp8_e5m2", 5, 2, 15, "ieee"),  # OCP E5M2, max 57344
        FloatFormat("fp6_e3m2", 3, 2, 3, "none"),  # OCP MX FP6, max 28
        FloatFormat("fp6_e2m3", 2, 3, 1, "none"),  # OCP MX FP6, max 7.5
        FloatFormat("fp4_e2m1", 2, 1, 1, "none"),  # OCP MX FP4, max 6
        E8M0Format(),
        DtypeFormat("fp32", torch.float32),
        DtypeFormat("fp16", torch.float16),
        DtypeFormat("bf16", torch.bfloat16),
    ]
    formats += [IntFormat(b, signed) for signed in (True, False) for b in range(2, 9)]
    return {f.name: f for f in formats}


FORMATS: dict[str, ElementFormat] = _build()


def format_names() -> list[str]:
    """Every registered format name."""
    return list(FORMATS)


def get_format(name: str) -> ElementFormat:
    """The format called ``name`` (e.g. ``"int4"``, ``"fp8_e4m3"``, ``"fp4_e2m1"``, ``"e8m0"``).

    Raises ValueError listing the known names when ``name`` is unknown.
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown number format '{name}'; known: {', '.join(FORMATS)}"
        ) from None
