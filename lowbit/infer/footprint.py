"""Bytes a batch-1 decode step reads: the weights in the form the kernels read them, and the KV
cache (a static cache is read whole by every step)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.nn.quant_linear import QuantLinear


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of parameters and buffers one decode step streams.

    A QuantLinear with a prepared kernel counts that kernel's buffers (not its stored tensors);
    one on the reference path counts its cached dequantized weight if built. An embedding counts
    one row, unless its matrix is also a linear's weight (a tied LM head reads all of it).
    Shared tensors count once.
    """
    linear_weights = {
        m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Linear)
    }
    skip: set[int] = set()
    extra = 0
    for m in model.modules():
        fast = getattr(m, "fast", None)
        if isinstance(m, QuantLinear) and (fast is not None or m._dequantized is not None):
            skip.update(getattr(m, n).data_ptr() for n in m.tensor_names)
            if fast is None:
                extra += m._dequantized.numel() * m._dequantized.element_size()
        elif isinstance(m, nn.Embedding) and m.weight.data_ptr() not in linear_weights:
            skip.add(m.weight.data_ptr())
            extra += m.weight.shape[1] * m.weight.element_size()
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        parts = [t] if t.layout == torch.strided else [t.crow_indices(), t.col_indices(),
                                                       t.values()]
        for part in parts:
            ptr = part.data_ptr()
            if part.numel() and ptr not in skip:
                seen[ptr] = max(seen.get(ptr, 0), part.numel() * part.element_size())
    return sum(seen.values()) + extra


def kv_cache_bytes(cache) -> int:
    """Bytes of a (static) KV cache's key and value tensors: what attention reads per step."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None:
                total += t.numel() * t.element_size()
    return total
