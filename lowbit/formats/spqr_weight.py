"""A stored SpQR weight: packed codes, bilevel statistics, a column permutation, CSR outliers.

Layout of a weight ``W [R, C]`` (``R`` outputs, ``C`` inputs) with ``b``-bit codes, first-level
groups of ``beta1`` consecutive *stored* columns and second-level groups of ``beta2`` rows:

- ``qweight``: uint8, the ``[R, C]`` codes packed densely (``b`` bits each), row-major in stored
  column order: stored column ``j`` is input column ``perm[j]``.
- ``scale_q``/``scale_s2``/``scale_z2`` and ``zero_q``/``zero_s2``/``zero_z2``: the first-level
  scales and zeros ``[R, n]`` (``n = ceil(C / beta1)``) as :class:`BilevelStats` (packed
  ``b_s``-bit codes, fp16 second-level scale and zero per ``beta2`` rows of one group column).
- ``perm``: int16 (int32 beyond 32767 columns) ``[C]``, absent without act-order.
- ``outlier_rowptr`` int32 ``[R + 1]``, ``outlier_cols`` int16/int32 ``[nnz]`` (stored column
  order), ``outlier_values`` fp16 ``[nnz]``: CSR of the outliers. An outlier's value is the
  correction added to the dense value at its position, so the weight is *dense + sparse*.

The weight is, in stored column order, ``s[r, g] * (q[r, c] - z[r, g]) + outlier[r, c]`` with
``g = c // beta1`` and ``s``, ``z`` the dequantized bilevel statistics (fp32 arithmetic); the
model's weight is that matrix with its columns put back in input order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.bilevel import BilevelStats
from lowbit.formats.bits import (
    Part,
    bilevel_parts,
    index_bits,
    outlier_parts,
    permutation_parts,
)
from lowbit.formats.codecs import register_codec
from lowbit.formats.intq import expand_groups
from lowbit.formats.packing import pack_codes, unpack_codes


def _index_dtype(size: int) -> torch.dtype:
    return torch.int16 if index_bits(size) == 16 else torch.int32


@register_codec
@dataclass(frozen=True)
class SpQRWeight:
    """SpQR weight ``[out_features, in_features]`` (see the module docstring for the layout).

    Attributes:
        bits: code width ``b_w``; ``beta1``: columns per first-level group; ``beta2``: rows per
            second-level group; ``scale_bits``/``zero_bits``: first-level statistic widths.
    """

    out_features: int
    in_features: int
    bits: int
    beta1: int
    beta2: int
    scale_bits: int
    zero_bits: int
    qweight: torch.Tensor
    scale_stats: BilevelStats
    zero_stats: BilevelStats
    outlier_rowptr: torch.Tensor
    outlier_cols: torch.Tensor
    outlier_values: torch.Tensor
    perm: torch.Tensor | None = None

    kind = "spqr"

    def __post_init__(self) -> None:
        rows, cols = self.out_features, self.in_features
        n = self.num_groups
        for name, stats in (("scale", self.scale_stats), ("zero", self.zero_stats)):
            if stats.shape != (rows, n) or stats.beta2 != self.beta2:
                raise ValueError(
                    f"{name} statistics must be [{rows}, {n}] with beta2 "
                    f"{self.beta2}, got {stats.shape}, beta2 {stats.beta2}"
                )
        nnz = self.outlier_values.numel()
        checks = [
            (self.outlier_rowptr, torch.int32, (rows + 1,)),
            (self.outlier_cols, _index_dtype(cols), (nnz,)),
            (self.outlier_values, torch.float16, (nnz,)),
        ]
        if self.perm is not None:
            checks.append((self.perm, _index_dtype(cols), (cols,)))
        for t, dtype, shape in checks:
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(
                    f"CSR/permutation tensor must be {dtype} {shape}, got "
                    f"{t.dtype} {tuple(t.shape)}"
                )

    @property
    def num_groups(self) -> int:
        return -(-self.in_features // self.beta1)

    @classmethod
    def from_parts(
        cls,
        codes: torch.Tensor,
        bits: int,
        beta1: int,
        scale_stats: BilevelStats,
        zero_stats: BilevelStats,
        outliers: torch.Tensor,
        perm: torch.Tensor | None = None,
    ) -> SpQRWeight:
        """Pack codes ``[R, C]`` (stored order), the bilevel statistics ``[R, n]``, the outlier
        corrections (a dense ``[R, C]`` float tensor, nonzero only at outliers; they are stored
        in fp16, so pass fp16-representable values for an exact round trip) and ``perm``."""
        rows, cols = codes.shape
        mask = outliers != 0
        rowptr = torch.zeros(rows + 1, dtype=torch.int32, device=codes.device)
        rowptr[1:] = torch.cumsum(mask.sum(dim=1), 0).to(torch.int32)
        idx = mask.nonzero()  # row-major: sorted by row, then column
        return cls(
            rows,
            cols,
            bits,
            beta1,
            scale_stats.beta2,
            scale_stats.bits,
            zero_stats.bits,
            pack_codes(codes, bits),
            scale_stats,
            zero_stats,
            rowptr,
            idx[:, 1].to(_index_dtype(cols)),
            outliers[mask].to(torch.float16),
            None if perm is None else perm.to(_index_dtype(cols)),
        )

    # ---- decoding -------------------------------------------------------------------------

    def codes(self) -> torch.Tensor:
        """uint8 ``[R, C]`` codes in stored column order."""
        numel = self.out_features * self.in_features
        return unpack_codes(self.qweight, self.bits, numel).view(self.out_features, -1)

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 scales and zeros ``[R, n]``: the dequantized bilevel statistics."""
        return self.scale_stats.dequantize(), self.zero_stats.dequantize()

    def outlier_rows(self) -> torch.Tensor:
        """int64 ``[nnz]`` row of each outlier (expanded from the CSR row offsets)."""
        counts = (self.outlier_rowptr[1:] - self.outlier_rowptr[:-1]).long()
        rows = torch.arange(self.out_features, device=counts.device)
        return torch.repeat_interleave(rows, counts)

    def dense_stored(self) -> torch.Tensor:
        """fp32 ``[R, C]`` dense part ``s * (q - z)`` in stored column order (no outliers)."""
        scale, zero = self.statistics()
        s = expand_groups(scale, self.beta1, self.in_features)
        z = expand_groups(zero, self.beta1, self.in_features)
        return s * (self.codes().float() - z)

    def dequantize_stored(self) -> torch.Tensor:
        """fp32 ``[R, C]`` weight in stored column order: dense part plus outliers."""
        w = self.dense_stored()
        rows, cols = self.outlier_rows(), self.outlier_cols.long()
        w[rows, cols] += self.outlier_values.float()
        return w

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[R, C]`` weight in the model's input column order."""
        w = self.dequantize_stored()
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm.long())]
        return w

    # ---- storage --------------------------------------------------------------------------

    @property
    def outlier_count(self) -> int:
        return self.outlier_values.numel()

    @property
    def outlier_rate(self) -> float:
        return self.outlier_count / (self.out_features * self.in_features)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor, by name."""
        out = {"qweight": self.qweight}
        out.update(self.scale_stats.tensors("scale"))
        out.update(self.zero_stats.tensors("zero"))
        if self.perm is not None:
            out["perm"] = self.perm
        out.update(
            outlier_rowptr=self.outlier_rowptr,
            outlier_cols=self.outlier_cols,
            outlier_values=self.outlier_values,
        )
        return out

    def meta(self) -> dict:
        """JSON-able description that, with :meth:`tensors`, rebuilds this weight."""
        return {
            "kind": self.kind,
            "out_features": self.out_features,
            "in_features": self.in_features,
            "bits": self.bits,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "scale_bits": self.scale_bits,
            "zero_bits": self.zero_bits,
        }

    @classmethod
    def from_stored(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> SpQRWeight:
        rows, cols = meta["out_features"], meta["in_features"]
        n = -(-cols // meta["beta1"])
        scale = BilevelStats.from_tensors(
            tensors, "scale", rows, n, meta["scale_bits"], meta["beta2"]
        )
        zero = BilevelStats.from_tensors(tensors, "zero", rows, n, meta["zero_bits"], meta["beta2"])
        return cls(
            rows,
            cols,
            meta["bits"],
            meta["beta1"],
            meta["beta2"],
            meta["scale_bits"],
            meta["zero_bits"],
            tensors["qweight"],
            scale,
            zero,
            tensors["outlier_rowptr"],
            tensors["outlier_cols"],
            tensors["outlier_values"],
            tensors.get("perm"),
        )

    def parts(self) -> list[Part]:
        """The layout by :mod:`~lowbit.formats.bits` (tested equal to :meth:`tensors`)."""
        rows, cols, n = self.out_features, self.in_features, self.num_groups
        parts = [Part("qweight", rows * cols, self.bits, packed=True)]
        parts += bilevel_parts("scale", rows, n, self.scale_bits, self.beta2)
        parts += bilevel_parts("zero", rows, n, self.zero_bits, self.beta2)
        if self.perm is not None:
            parts += permutation_parts(cols)
        return parts + outlier_parts(rows, cols, self.outlier_count)

    def stored_bits(self) -> int:
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors().values())

    def bits_per_weight(self) -> float:
        """Stored bits (codes, both levels of statistics, permutation, CSR outliers) per
        weight: 8 x the bytes of :meth:`tensors` / (R x C)."""
        return self.stored_bits() / (self.out_features * self.in_features)
