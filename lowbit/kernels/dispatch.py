"""Chooses the matmul for a quantized linear: a registered fast path for its stored-weight kind
when one applies, else the reference dequantize-and-matmul (the oracle tests compare against)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.kernels import reference

# kind -> fn(module, x) returning y, or None when it does not apply to this module/input.
FastPath = Callable[[torch.nn.Module, torch.Tensor], "torch.Tensor | None"]
_FAST_PATHS: dict[str, list[FastPath]] = {}


def register_fast_path(kind: str, fn: FastPath) -> FastPath:
    """Add a fast path for stored weights of ``kind`` (tried in registration order)."""
    _FAST_PATHS.setdefault(kind, []).append(fn)
    return fn


def linear(module: torch.nn.Module, x: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """``y = x W^T + b`` for a QuantLinear ``module``; ``kernel`` is ``auto`` or ``reference``.

    Args:
        x: ``[..., in_features]``. Returns ``[..., out_features]`` in ``x.dtype``.
    """
    if kernel == "auto":
        for fn in _FAST_PATHS.get(module.weight_meta["kind"], []):
            y = fn(module, x)
            if y is not None:
                return y
    return reference.linear(x, module.dequantized_weight(), module.bias)
