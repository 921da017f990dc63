"""The weight-quantization settings shared by integer weight-only methods."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from lowbit.core.config import MethodConfig
from lowbit.errors import LowbitError
from lowbit.formats.intq import IntGrid


@dataclass(frozen=True)
class IntWeightConfig(MethodConfig):
    """Integer weights on a min-max grid.

    Attributes:
        bits: 2..8.
        group_size: -1 per output channel, else columns per group.
        symmetric: symmetric grid (zero at mid code) or asymmetric (stored zero per group).
        ragged_groups: allow a group size that does not divide a layer's input width (the last
            group of each row is shorter, as GPTQModel does); otherwise that is an error.
        ignore: glob patterns of linear names (e.g. ``"*.mlp.down_proj"``) left in full
            precision. The embeddings and the LM head are never quantized by these methods.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    ragged_groups: bool = False
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise LowbitError(f"bits must be between 2 and 8, got {self.bits}")
        if self.group_size != -1 and self.group_size < 2:
            raise LowbitError(f"group size must be -1 (per channel) or >= 2, got {self.group_size}")

    @property
    def grid(self) -> IntGrid:
        return IntGrid(self.bits, self.group_size, self.symmetric)

    def ignores(self, name: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for pattern in self.ignore)

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """The group size must divide the input width of every linear quantized (ragged groups
        off); subclasses with a rank add :func:`check_rank` and call this first."""
        widths = sorted({cols for _rows, cols in shapes.values()})
        for name, (_rows, cols) in shapes.items():
            if not self.ignores(name):
                self.check_width(name, cols, widths)

    def estimated_bits(self) -> float:
        """``bits`` plus an fp16 scale and zero point per group."""
        return self.bits + (32 / self.group_size if self.group_size > 0 else 0.0)

    def check_width(self, name: str, in_features: int, all_widths: list[int]) -> None:
        """LowbitError if the group size does not divide ``in_features`` and ragged is off."""
        if self.group_size == -1 or self.ragged_groups or in_features % self.group_size == 0:
            return
        raise LowbitError(
            f"group size {self.group_size} does not divide the input width {in_features} of "
            f"{name}; group sizes that divide every width: {_common_divisors(all_widths)}, "
            "or -1 (per channel), or allow a shorter last group with --ragged-groups"
        )


def check_rank(
    config: IntWeightConfig, flag: str, rank: int, shapes: dict[str, tuple[int, int]]
) -> None:
    """LowbitError when ``rank`` exceeds min(rows, columns) of a linear ``config`` quantizes:
    no rank-``rank`` factorization of that layer exists (LoRC's SVD), or its factors would add
    parameters without adding rank (trained low-rank terms)."""
    quantized = {n: s for n, s in shapes.items() if not config.ignores(n)}
    if not quantized:
        return
    name, (rows, cols) = min(quantized.items(), key=lambda item: min(item[1]))
    most = min(rows, cols)
    if rank > most:
        raise LowbitError(
            f"{flag} {rank} is above min(rows, columns) = {most} of {name} ({rows} x {cols}); "
            f"a rank above it does not exist for that layer: choose {flag} between 1 and {most}"
        )


def _common_divisors(widths: list[int]) -> str:
    from math import gcd

    g = 0
    for w in widths:
        g = gcd(g, w)
    return ", ".join(str(d) for d in range(8, g + 1) if g % d == 0)
