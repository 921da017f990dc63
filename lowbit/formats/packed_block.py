"""A stored block-scaled weight (NVFP4, MXFP4/6/8, ZeroQuant-FP M1/M2, int/fp + any scale).

Every byte is a tensor in :meth:`PackedBlockWeight.tensors`, so :meth:`bits_per_weight` is the
saved size by construction. Element codes are packed densely with
:func:`~lowbit.formats.packing.pack_codes`: 4-bit codes (FP4) go two per byte, the first in
the low nibble, which for rows of even length is the byte layout compressed-tensors uses for
``nvfp4-pack-quantized`` weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.blockscale import (
    BlockQuantized,
    BlockScaledConfig,
    BlockScales,
    quantize_blocks,
)
from lowbit.formats.packing import pack_codes, unpack_codes


@dataclass(frozen=True)
class PackedBlockWeight:
    """Block-scaled weight ``[out_features, in_features]``.

    Tensors:
        qweight: uint8 ``[ceil(R*C/8) * bits]`` element codes packed row-major.
        scales, row_scales, tensor_scale: as in :class:`~lowbit.formats.blockscale.BlockScales`.
    """

    out_features: int
    in_features: int
    config: BlockScaledConfig
    qweight: torch.Tensor
    scales: torch.Tensor
    row_scales: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None

    kind = "block"

    def __post_init__(self) -> None:
        self.block_scales()  # validates shapes against the config

    @classmethod
    def from_quantized(cls, q: BlockQuantized) -> PackedBlockWeight:
        s = q.scales
        bits = q.config.element_format.bits
        return cls(s.rows, s.cols, q.config, pack_codes(q.codes, bits), s.scales,
                   s.row_scales, s.tensor_scale)

    @classmethod
    def quantize(cls, w: torch.Tensor, config: BlockScaledConfig) -> PackedBlockWeight:
        """Quantize float ``w [R, C]`` with :func:`quantize_blocks` and pack it."""
        return cls.from_quantized(quantize_blocks(w, config))

    def block_scales(self) -> BlockScales:
        return BlockScales(self.config, self.out_features, self.in_features, self.scales,
                           self.row_scales, self.tensor_scale)

    def codes(self) -> torch.Tensor:
        """uint8 ``[R, C]`` element codes."""
        numel = self.out_features * self.in_features
        bits = self.config.element_format.bits
        return unpack_codes(self.qweight, bits, numel).view(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[R, C]``."""
        return BlockQuantized(self.codes(), self.block_scales()).dequantize()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor, by name."""
        return {"qweight": self.qweight, **self.block_scales().tensors()}

    def meta(self) -> dict:
        """JSON-able description that, with :meth:`tensors`, rebuilds this weight."""
        return {"kind": self.kind, "out_features": self.out_features,
                "in_features": self.in_features, "config": self.config.to_dict()}

    @classmethod
    def from_stored(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> PackedBlockWeight:
        return cls(meta["out_features"], meta["in_features"],
                   BlockScaledConfig.from_dict(meta["config"]), tensors["qweight"],
                   tensors["scales"], tensors.get("row_scales"), tensors.get("tensor_scale"))

    def stored_bits(self) -> int:
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors().values())

    def bits_per_weight(self) -> float:
        """Stored bits (codes and every level of scales) per weight."""
        return self.stored_bits() / (self.out_features * self.in_features)
