"""Choose every quantized layer's kernel for the activation dtype the model will run in."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from lowbit.kernels import dispatch
from lowbit.nn.quant_linear import QuantLinear


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's parameters (its activation dtype)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def prepare_model(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, str]:
    """Attach each QuantLinear's kernel for activations of ``dtype`` (default: the model's
    dtype) on the model's device; returns ``{layer name: path}`` (``int4``, ``dense``, ...)."""
    dtype = dtype or model_dtype(model)
    paths = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            device = getattr(module, module.tensor_names[0]).device
            paths[name] = dispatch.prepare(module, dtype, device)
    return paths


def path_counts(paths: dict[str, str]) -> dict[str, int]:
    """``{path: number of layers}``, most common first."""
    return dict(Counter(paths.values()).most_common())
