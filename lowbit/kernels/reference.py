"""The oracle: dequantize the stored weight, then a dense matmul."""

from __future__ import annotations

import torch


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` in ``x``'s dtype.

    Args:
        x: ``[..., in_features]``.
        weight: dequantized ``[out_features, in_features]``.
        bias: ``[out_features]`` or None.
    """
    w = weight.to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
