"""llama.cpp block types as a stored weight: :class:`GGUFBlockWeight` holds the exact ggml bytes
of every row, so a GGUF writer copies ``raw`` as the tensor's data.

The contract other modules rely on: :class:`GGUFBlockWeight` (``ggml_type``, ``raw``),
:func:`quantize_rows`, :func:`dequantize_rows`, :func:`fallback_type`. A weight ``[out, in]``
is ``out`` ggml rows of ``in`` elements (blocks run along the input dimension).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.codecs import register_codec
from lowbit.formats.gguf_layout import TYPES, BlockFields, decode, encode, unpack
from lowbit.formats.gguf_layout import ggml_type as get_type
from lowbit.formats.gguf_quant import quantize_fields

GGUF_TYPES = tuple(TYPES)  # q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, q3_k, q2_k

# llama.cpp's llama_tensor_get_type: a K type on a row width that is not a multiple of 256
# becomes this type (and f16 when the width is not a multiple of 32 either)
# (llama-quant.cpp's tensor_type_fallback)
K_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "q3_k": "q4_0", "q2_k": "q4_0"}


def fallback_type(ggml_type_name: str, in_features: int) -> str:
    """The type llama-quantize stores a ``[*, in_features]`` weight in when asked for
    ``ggml_type_name``: K types on widths not divisible by 256 fall back (q4_k -> q5_0, q5_k ->
    q5_1, q6_k -> q8_0, q3_k and q2_k -> q4_0), and a width the chosen type's block does not divide
    becomes ``"f16"``."""
    t = get_type(ggml_type_name)
    name = t.name
    if in_features % t.block and name in K_FALLBACK:
        name = K_FALLBACK[name]
    return name if in_features % TYPES[name].block == 0 else "f16"


@register_codec
@dataclass(frozen=True)
class GGUFBlockWeight:
    """A weight ``[out_features, in_features]`` in ggml block type ``ggml_type`` (lowercase,
    e.g. ``"q4_k"``).

    Tensors:
        raw: uint8 ``[out_features, row_bytes]``, row ``r`` the exact ggml bytes of weight row
            ``r`` (``row_bytes = in_features / block * bytes_per_block``).
    """

    out_features: int
    in_features: int
    ggml_type: str
    raw: torch.Tensor

    kind = "gguf"

    def __post_init__(self) -> None:
        t = get_type(self.ggml_type)
        if self.in_features % t.block:
            raise ValueError(f"{t.name} needs an input width divisible by {t.block}, got "
                             f"{self.in_features}")
        shape = (self.out_features, t.row_bytes(self.in_features))
        if self.raw.dtype != torch.uint8 or tuple(self.raw.shape) != shape:
            raise ValueError(f"{t.name} raw must be uint8 {shape}, got {self.raw.dtype} "
                             f"{tuple(self.raw.shape)}")

    @classmethod
    def from_fields(cls, fields: BlockFields, ggml_type_name: str) -> GGUFBlockWeight:
        rows, cols = fields.q.shape
        return cls(rows, cols, ggml_type_name, encode(get_type(ggml_type_name), fields))

    def fields(self) -> BlockFields:
        """The unpacked codes and block parameters."""
        return unpack(get_type(self.ggml_type), self.raw, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[out_features, in_features]``, equal to llama.cpp's dequantization."""
        return decode(get_type(self.ggml_type), self.fields())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"raw": self.raw}

    def meta(self) -> dict:
        return {"kind": self.kind, "out_features": self.out_features,
                "in_features": self.in_features, "ggml_type": self.ggml_type}

    @classmethod
    def from_stored(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> GGUFBlockWeight:
        return cls(meta["out_features"], meta["in_features"], meta["ggml_type"], tensors["raw"])

    def bits_per_weight(self) -> float:
        """Stored bits per weight: exactly the type's (q2_k 2.625, q3_k 3.4375, q4_k 4.5, q6_k
        6.5625, q8_0 8.5 ...)."""
        return self.raw.numel() * 8 / (self.out_features * self.in_features)


def quantize_rows(
    w: torch.Tensor,
    ggml_type: str,
    importance: torch.Tensor | None = None,
    chunk_rows: int = 256,
) -> GGUFBlockWeight:
    """Round ``w`` fp32 ``[R, C]`` to nearest on ``ggml_type`` (llama.cpp's reference
    quantizers; with ``importance`` ``[C]`` >= 0, its imatrix-weighted ones), ``chunk_rows`` rows
    at a time."""
    return GGUFBlockWeight.from_fields(fit_rows(w, ggml_type, importance, chunk_rows), ggml_type)


def fit_rows(
    w: torch.Tensor, ggml_type: str, importance: torch.Tensor | None = None,
    chunk_rows: int = 256,
) -> BlockFields:
    """:func:`quantize_rows`'s fields (codes and block parameters) before packing."""
    t = get_type(ggml_type)
    if w.shape[1] % t.block:
        raise ValueError(f"{t.name} needs a row width divisible by {t.block}, got {w.shape[1]}")
    parts = [quantize_fields(w[i : i + chunk_rows], t, importance)
             for i in range(0, w.shape[0], chunk_rows)]
    return BlockFields(*(_cat([getattr(p, name) for p in parts])
                         for name in ("q", "d", "m", "sc", "mn")))


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat(parts)


def dequantize_rows(raw: torch.Tensor, ggml_type: str, in_features: int) -> torch.Tensor:
    """fp32 ``[R, in_features]`` of ggml bytes ``raw`` uint8 ``[R, row_bytes]``."""
    return GGUFBlockWeight(raw.shape[0], in_features, ggml_type, raw).dequantize()
