"""Checks on a model before the engine spends time on it."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core.threads import torch_threads
from lowbit.errors import LowbitError

_CHUNK = 1 << 20


@torch.no_grad()
def check_finite_weights(model: nn.Module) -> None:
    """LowbitError naming the first parameter or buffer (in ``state_dict`` order) that holds a
    NaN or an infinity: quantizing it would give NaN scales and a useless model."""
    for name, tensor in model.state_dict().items():
        error = nonfinite_error(name, tensor)
        if error is not None:
            raise error


@torch.no_grad()
def nonfinite_error(name: str, tensor: torch.Tensor) -> LowbitError | None:
    """The LowbitError for weight ``name`` if it holds NaN or infinite values, else None.

    Checked in chunks of 1M values: ``isfinite`` of a whole embedding matrix would briefly
    take ~1.7x its size (measured), more than the rest of a streamed run needs.
    """
    if not tensor.is_floating_point():
        return None
    chunks = tensor.detach().reshape(-1).split(_CHUNK)
    with torch_threads(1):  # many small checks (lowbit.core.threads)
        if all(bool(torch.isfinite(c).all()) for c in chunks):
            return None
    nans = int(torch.isnan(tensor).sum())
    infs = int(torch.isinf(tensor).sum())
    return LowbitError(
        f"model weight {name} holds {nans} NaN and {infs} infinite values (of "
        f"{tensor.numel()}); the model files are damaged or were converted with an overflow: "
        "re-create them from the original checkpoint before quantizing"
    )
