"""Honest bit accounting: bits per weight = 8 x stored bytes / number of weights.

A stored layer is a list of :class:`Part` s (codes, every level of statistics, outliers, the
permutation, low-rank factors), each a count of items of a given width, stored either densely
packed with :func:`~lowbit.formats.packing.pack_codes` (``ceil(count / 8) * bits`` bytes) or
one whole item per ``bits / 8`` bytes. The ``*_parts`` helpers give the parts of each layout
*before* anything is quantized, and are tested against the bytes the stored objects hold::

    bits_per_weight = sum(part.stored_bits() for part in parts) / (rows * cols)

For SpQR (3-bit codes, 3-bit bilevel scales and zeros, beta1 = beta2 = 16, fp16 second level)
this gives ``3 + (3 + 3) / 16 + 64 / 256 = 3.625`` plus permutation and outliers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from lowbit.formats.blockscale import BlockScaledConfig
from lowbit.formats.intq import IntGrid
from lowbit.formats.packing import packed_nbytes


@dataclass(frozen=True)
class Part:
    """``count`` stored items of ``bits`` bits each.

    Attributes:
        name: what it is (``"qweight"``, ``"scales"``, ``"outlier_values"``, ...).
        count: number of items.
        bits: width of one item.
        packed: densely packed (any width 1..8, padded to chunks of 8 items) vs whole bytes
            per item (``bits`` a multiple of 8).
    """

    name: str
    count: int
    bits: int
    packed: bool = False

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"{self.name}: count must be >= 0, got {self.count}")
        if self.packed and not 1 <= self.bits <= 8:
            raise ValueError(f"{self.name}: packed items have 1..8 bits, got {self.bits}")
        if not self.packed and (self.bits <= 0 or self.bits % 8):
            raise ValueError(f"{self.name}: unpacked items take whole bytes, got {self.bits} bits")

    def stored_bits(self) -> int:
        if self.packed:
            return 8 * packed_nbytes(self.count, self.bits)
        return self.count * self.bits


def bits_per_weight(numel: int, parts: Iterable[Part]) -> float:
    """Stored bits per weight of a layer of ``numel`` weights made of ``parts``."""
    if numel <= 0:
        raise ValueError(f"numel must be positive, got {numel}")
    return sum(p.stored_bits() for p in parts) / numel


def tensor_parts(tensors: Mapping[str, torch.Tensor]) -> list[Part]:
    """The parts actually held by stored tensors (what a safetensors file holds, less header)."""
    return [Part(name, t.numel() * t.element_size(), 8) for name, t in tensors.items()]


def index_bits(size: int) -> int:
    """Width of a stored index into ``size`` positions: int16 up to 32767, else int32."""
    return 16 if size <= torch.iinfo(torch.int16).max else 32


def int_grid_parts(grid: IntGrid, rows: int, cols: int, perm: bool = False) -> list[Part]:
    """Parts of a :class:`~lowbit.formats.packed_int.PackedIntWeight` on ``grid``."""
    n = rows * grid.num_groups(cols)
    parts = [Part("qweight", rows * cols, grid.bits, packed=True), Part("scales", n, 16)]
    if not grid.symmetric:
        parts.append(Part("zeros", n, grid.bits, packed=True) if grid.round_zero
                     else Part("zeros", n, 16))
    if perm:
        parts.append(permutation_parts(cols)[0])
    return parts


def block_parts(cfg: BlockScaledConfig, rows: int, cols: int) -> list[Part]:
    """Parts of a :class:`~lowbit.formats.packed_block.PackedBlockWeight` under ``cfg``."""
    rb, nb, _ = cfg.block_grid(rows, cols)
    sbits = cfg.scale_fmt.bits
    block_bits = 8 if cfg.scale_rule == "m2" or sbits <= 8 else sbits  # codes take a byte
    parts = [Part("qweight", rows * cols, cfg.element_format.bits, packed=True),
             Part("scales", rb * nb, block_bits)]
    if cfg.scale_rule == "m2":
        parts.append(Part("row_scales", rows, sbits))
    if cfg.tensor_scale:
        parts.append(Part("tensor_scale", 1, 32))
    return parts


def bilevel_parts(prefix: str, rows: int, n: int, bits: int, beta2: int) -> list[Part]:
    """Parts of :class:`~lowbit.formats.bilevel.BilevelStats` for ``[rows, n]`` statistics."""
    groups = -(-rows // beta2) * n
    return [Part(f"{prefix}_q", rows * n, bits, packed=True), Part(f"{prefix}_s2", groups, 16),
            Part(f"{prefix}_z2", groups, 16)]


def permutation_parts(cols: int) -> list[Part]:
    """A stored column permutation: one index per input column."""
    return [Part("perm", cols, index_bits(cols))]


def outlier_parts(rows: int, cols: int, nnz: int, value_bits: int = 16) -> list[Part]:
    """Sparse outliers in CSR: int32 row offsets ``[rows + 1]``, per outlier a value and a
    column index."""
    return [Part("outlier_rowptr", rows + 1, 32), Part("outlier_values", nnz, value_bits),
            Part("outlier_cols", nnz, index_bits(cols))]


def lowrank_parts(rows: int, cols: int, rank: int, value_bits: int = 16) -> list[Part]:
    """Low-rank factors ``U [rows, rank]`` and ``V [rank, cols]`` (LoRC, LR-QAT adapters)."""
    return [Part("lowrank_u", rows * rank, value_bits), Part("lowrank_v", rank * cols, value_bits)]
