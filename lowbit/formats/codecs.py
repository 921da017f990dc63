"""Registry of stored weight representations, by their ``kind`` in ``lowbit.json``."""

from __future__ import annotations

from typing import Protocol

import torch

from lowbit.formats.packed_block import PackedBlockWeight
from lowbit.formats.packed_int import PackedIntWeight


class StoredWeight(Protocol):
    """What a quantized linear layer needs from its stored weight."""

    out_features: int
    in_features: int
    kind: str

    def dequantize(self) -> torch.Tensor: ...  # fp32 [out_features, in_features]
    def tensors(self) -> dict[str, torch.Tensor]: ...
    def meta(self) -> dict: ...
    def bits_per_weight(self) -> float: ...


CODECS: dict[str, type] = {
    PackedIntWeight.kind: PackedIntWeight,
    PackedBlockWeight.kind: PackedBlockWeight,
}


def register_codec(cls: type) -> type:
    """Class decorator: make a stored-weight class loadable by its ``kind``."""
    CODECS[cls.kind] = cls
    return cls


def stored_weight_from(meta: dict, tensors: dict[str, torch.Tensor]) -> StoredWeight:
    kind = meta.get("kind")
    if kind not in CODECS:
        raise ValueError(f"unknown stored weight kind '{kind}'; known: {', '.join(CODECS)}")
    return CODECS[kind].from_stored(meta, tensors)
