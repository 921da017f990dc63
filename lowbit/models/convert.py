"""Module surgery that gives every quantizable matrix of a causal LM the shape of an
``nn.Linear``, applied the same way when a model is loaded for quantization and when a
quantized folder is rebuilt (so saved names always match):

- fused mixture-of-experts weights (3-D parameters) become one linear per expert matrix
  (:func:`lowbit.models.experts.unfuse_experts`);
- GPT-2's ``Conv1D`` (``y = x W + b`` with ``W`` ``[in, out]``) becomes an ``nn.Linear`` holding
  ``W^T`` (the same outputs; the engine, methods and kernels all read ``[out, in]`` weights).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models.arch import set_submodule
from lowbit.models.experts import unfuse_experts


def conv1d_to_linear(model: nn.Module) -> list[str]:
    """Replace every transformers ``Conv1D`` of ``model`` by the equivalent ``nn.Linear``, in
    place; returns the names replaced."""
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name in names:
        conv = model.get_submodule(name)
        in_features, out_features = conv.weight.shape
        linear = nn.Linear(in_features, out_features, bias=conv.bias is not None,
                           device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        set_submodule(model, name, linear)
    return names


def linear_layout(model: nn.Module) -> dict[str, list[str]]:
    """Apply every conversion to ``model`` in place; returns what each one replaced, also
    kept on the model for :func:`layout_of` (exports need to know)."""
    done = {"experts": unfuse_experts(model), "conv1d": conv1d_to_linear(model)}
    model.lowbit_layout = done
    return done


def layout_of(model: nn.Module) -> dict[str, list[str]]:
    """What :func:`linear_layout` replaced in ``model`` (nothing when it never ran)."""
    return getattr(model, "lowbit_layout", {"experts": [], "conv1d": []})
