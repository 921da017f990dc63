"""Checks on a model before the engine spends time on it."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError


@torch.no_grad()
def check_finite_weights(model: nn.Module) -> None:
    """LowbitError naming the first parameter or buffer (in ``state_dict`` order) that holds a
    NaN or an infinity: quantizing it would give NaN scales and a useless model."""
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
            continue
        nans = int(torch.isnan(tensor).sum())
        infs = int(torch.isinf(tensor).sum())
        raise LowbitError(
            f"model weight {name} holds {nans} NaN and {infs} infinite values (of "
            f"{tensor.numel()}); the model files are damaged or were converted with an overflow: "
            "re-create them from the original checkpoint before quantizing"
        )
