"""Integer quantization grids: symmetric and asymmetric, per-channel or per-group.

Conventions (those of GPTQ and its descendants, so checkpoints export without conversion):
codes are unsigned integers ``q`` in ``[0, 2**bits - 1]`` and the value is
``scale * (q - zero)``. Symmetric grids fix ``zero = 2**(bits-1)`` and
``scale = 2 * max|w| / (2**bits - 1)``; asymmetric grids use min-max over the group with
``[min, max]`` widened to contain 0. Scales are rounded to fp16 because that is how they are
stored, so the in-memory model equals the saved one bit for bit.

Granularity is one vocabulary: ``group_size = -1`` is per output channel (one group spanning
the input width), ``group_size = G`` splits the input width into groups of G columns; when G
does not divide the width and ``ragged`` is allowed, the last group is shorter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def max_code(bits: int) -> int:
    return (1 << bits) - 1


@dataclass(frozen=True)
class IntGrid:
    """An integer grid with its granularity.

    Attributes:
        bits: code width, 2..8.
        group_size: columns per group, -1 for one group per output row.
        symmetric: zero fixed at the mid code (not stored) vs. a stored zero per group.
        round_zero: asymmetric zeros rounded to integer codes (stored as codes) or kept real.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    round_zero: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be -1 (per channel) or >= 1, got {self.group_size}")

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        return -(-in_features // self.group_width(in_features))


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
