"""A stored integer weight: packed codes + per-group statistics (+ optional column order).

This is the on-disk and in-memory representation of a weight matrix quantized on an
:class:`~lowbit.formats.intq.IntGrid`. Every byte it holds is a tensor in :meth:`tensors`, so
its :meth:`bits_per_weight` is the saved size by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.intq import IntGrid, dequantize, expand_groups
from lowbit.formats.packing import pack_codes, unpack_codes


@dataclass(frozen=True)
class PackedIntWeight:
    """Integer weight ``[out_features, in_features]`` on ``grid``.

    Tensors:
        qweight: uint8 ``[ceil(R*C/8)*bits]``, codes packed densely, row-major over
            ``[R, C]`` in *stored column order* (the act-order permutation if ``perm`` is set).
        scales: fp16 ``[R, n_groups]``.
        zeros: asymmetric only: uint8 packed codes ``[R, n_groups]`` (``grid.round_zero``) or
            fp16 ``[R, n_groups]``; ``None`` for symmetric grids.
        perm: int16/int32 ``[C]`` or ``None``: stored column ``j`` is input column ``perm[j]``.
    """

    out_features: int
    in_features: int
    grid: IntGrid
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    perm: torch.Tensor | None = None

    kind = "int"

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        grid: IntGrid,
        perm: torch.Tensor | None = None,
    ) -> PackedIntWeight:
        """Pack ``codes`` ``[R, C]`` (stored order) with fp32 ``scales``/``zeros`` ``[R, n]``."""
        rows, cols = codes.shape
        stored_zeros = None
        if not grid.symmetric:
            stored_zeros = (
                pack_codes(zeros.round().to(torch.uint8), grid.bits)
                if grid.round_zero
                else zeros.to(torch.float16)
            )
        stored_perm = None
        if perm is not None:
            index_dtype = torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32
            stored_perm = perm.to(index_dtype)
        return cls(
            rows, cols, grid, pack_codes(codes, grid.bits), scales.to(torch.float16),
            stored_zeros, stored_perm,
        )

    def codes(self) -> torch.Tensor:
        """uint8 ``[R, C]`` codes in stored column order."""
        numel = self.out_features * self.in_features
        return unpack_codes(self.qweight, self.grid.bits, numel).view(
            self.out_features, self.in_features
        )

    def zero_points(self) -> torch.Tensor:
        """fp32 ``[R, n_groups]`` zero points (constant mid code when symmetric)."""
        if self.zeros is None:
            return torch.full(self.scales.shape, float(1 << (self.grid.bits - 1)),
                              device=self.scales.device)
        if self.zeros.dtype == torch.uint8:
            return unpack_codes(self.zeros, self.grid.bits, self.scales.numel()).view(
                self.scales.shape
            ).float()
        return self.zeros.float()

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[R, C]`` weights in the model's input column order."""
        group = self.grid.group_width(self.in_features)
        scale = expand_groups(self.scales.float(), group, self.in_features)
        zero = expand_groups(self.zero_points(), group, self.in_features)
        w = dequantize(self.codes().float(), scale, zero)
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm.long())]
        return w

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor, by name."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        if self.perm is not None:
            out["perm"] = self.perm
        return out

    def meta(self) -> dict:
        """JSON-able description that, with :meth:`tensors`, rebuilds this weight."""
        return {
            "kind": self.kind,
            "out_features": self.out_features,
            "in_features": self.in_features,
            "grid": self.grid.to_meta(),
        }

    @classmethod
    def from_stored(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> PackedIntWeight:
        return cls(
            meta["out_features"], meta["in_features"], IntGrid.from_meta(meta["grid"]),
            tensors["qweight"], tensors["scales"], tensors.get("zeros"), tensors.get("perm"),
        )

    def stored_bits(self) -> int:
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors().values())

    def bits_per_weight(self) -> float:
        """Stored bits (codes, statistics, permutation) per weight."""
        return self.stored_bits() / (self.out_features * self.in_features)
