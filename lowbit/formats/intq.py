"""Integer quantization grids: symmetric and asymmetric, per-channel or per-group.

Conventions (those of GPTQ and its descendants, so checkpoints export without conversion):
codes are unsigned integers ``q`` in ``[0, 2**bits - 1]`` and the value is
``scale * (q - zero)``. Symmetric grids fix ``zero = 2**(bits-1)`` and
``scale = 2 * max|w| / (2**bits - 1)``; asymmetric grids use min-max over the group with
``[min, max]`` widened to contain 0. Scales are rounded to fp16 because that is how they are
stored, so the in-memory model equals the saved one bit for bit.

Granularity is the one vocabulary of :mod:`lowbit.formats.granularity`: an integer grid is
:class:`~lowbit.formats.granularity.PerChannel` (one group spanning the input width) or
:class:`~lowbit.formats.granularity.Group` (groups of ``size`` columns; with ``ragged`` the last
group of a row is shorter when ``size`` does not divide the width).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lowbit.formats.granularity import (
    Group,
    PerChannel,
    PerTensor,
    as_granularity,
    from_stored,
    group_width,
    n_groups,
    to_stored,
)

if TYPE_CHECKING:
    from lowbit.formats.spec import WeightSpec


def max_code(bits: int) -> int:
    return (1 << bits) - 1


@dataclass(frozen=True)
class IntGrid:
    """An integer grid of ``bits`` (2..8) with its granularity (per channel or groups; an int
    is read as the stored ``group_size`` spelling, :func:`~lowbit.formats.granularity.from_stored`,
    so saved metadata and callers of that spelling keep working); ``symmetric``: zero fixed at
    the mid code (not stored) vs. a stored zero per group; ``round_zero``: asymmetric zeros
    rounded to integer codes (stored as codes) or kept real (fp16)."""

    bits: int = 4
    granularity: PerChannel | Group = Group(128)
    symmetric: bool = True
    round_zero: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        granularity = as_granularity(self.granularity)
        if isinstance(granularity, PerTensor):
            raise ValueError("integer grids are per channel or per group, not per tensor")
        if granularity is not self.granularity:  # an int in the stored spelling, read once
            object.__setattr__(self, "granularity", granularity)

    @classmethod
    def from_spec(cls, spec: WeightSpec, round_zero: bool = True) -> IntGrid:
        """The grid of an integer :class:`~lowbit.formats.spec.WeightSpec` (fp16 scales)."""
        if spec.is_float or spec.scale_format != "fp16":
            raise ValueError(
                f"an integer grid holds int codes with fp16 scales, not {spec.describe()}"
            )
        return cls(spec.bits, spec.granularity, spec.symmetric, round_zero)

    @property
    def group_size(self) -> int:
        """The stored spelling of the granularity: -1 per channel, else the group size."""
        return to_stored(self.granularity)

    def group_width(self, in_features: int) -> int:
        return group_width(self.granularity, in_features)

    def num_groups(self, in_features: int) -> int:
        return n_groups(self.granularity, in_features)

    def to_meta(self) -> dict:
        """The saved metadata (format version 1): ``bits``, ``group_size``, ``symmetric``,
        ``round_zero``."""
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "round_zero": self.round_zero}

    @classmethod
    def from_meta(cls, meta: dict) -> IntGrid:
        """The grid of :meth:`to_meta`'s dict."""
        return cls(meta.get("bits", 4), from_stored(meta.get("group_size", 128)),
                   meta.get("symmetric", True), meta.get("round_zero", True))


def minmax_params(
    w: torch.Tensor, bits: int, symmetric: bool, round_zero: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero for each row of ``w``.

    Args:
        w: ``[R, K]`` float weights of one group (or ``[R, n, K]`` for n groups at once).
    Returns:
        ``scale``, ``zero``: ``[R, 1]`` (or ``[R, n, 1]``) fp32; scale is fp16-representable.
    """
    maxq = max_code(bits)
    wmin = w.amin(dim=-1, keepdim=True).clamp(max=0)
    wmax = w.amax(dim=-1, keepdim=True).clamp(min=0)
    if symmetric:
        wmax = torch.maximum(wmax, -wmin)
        wmin = -wmax
    scale = (wmax - wmin) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale = scale.to(torch.float16).to(torch.float32).clamp(min=2**-24)
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = -wmin / scale
        zero = zero.round().clamp(0, maxq) if round_zero else zero.to(torch.float16).float()
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``clamp(round(w / scale) + zero, 0, maxq)`` as float (integer values)."""
    return torch.clamp(torch.round(w / scale + zero), 0, max_code(bits))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Values ``scale * (q - zero)``."""
    return scale * (q - zero)


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """``dequantize(quantize(w))``: the nearest grid value of each weight."""
    return dequantize(quantize(w, scale, zero, bits), scale, zero)


def pad_to_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """Pad ``[R, C]`` on the right to a multiple of ``group`` and view as ``[R, n, group]``.

    The padding repeats each row's last real column so it never widens a min-max range.
    Returns the view and the original width C.
    """
    rows, cols = w.shape
    pad = (-cols) % group
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    return w.reshape(rows, -1, group), cols


def rtn_quantize(
    w: torch.Tensor, grid: IntGrid
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest on ``grid``.

    Args:
        w: ``[R, C]`` float weights.
    Returns:
        codes ``[R, C]`` uint8, scales ``[R, n_groups]`` fp32, zeros ``[R, n_groups]`` fp32.
    """
    group = grid.group_width(w.shape[1])
    grouped, cols = pad_to_groups(w.float(), group)
    scale, zero = minmax_params(grouped, grid.bits, grid.symmetric, grid.round_zero)
    codes = quantize(grouped, scale, zero, grid.bits).reshape(w.shape[0], -1)[:, :cols]
    return codes.to(torch.uint8), scale.squeeze(-1), zero.squeeze(-1)


def expand_groups(stat: torch.Tensor, group: int, cols: int) -> torch.Tensor:
    """Per-group statistics ``[R, n]`` broadcast to per-column ``[R, cols]``."""
    return stat.repeat_interleave(group, dim=1)[:, :cols]
