"""QuantLinear: a linear layer whose weight is stored quantized (packed codes, not floats)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.codecs import StoredWeight, stored_weight_from
from lowbit.kernels import dispatch


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as a stored low-bit weight.

    The stored weight's tensors are buffers (so they are what ``state_dict`` saves); the
    dequantized fp32 weight ``[out_features, in_features]`` is cached after the first forward
    (drop it with :meth:`drop_cache`) and is never saved.
    """

    def __init__(self, weight: StoredWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.weight_meta = weight.meta()
        self.tensor_names = tuple(weight.tensors())
        for name, tensor in weight.tensors().items():
            self.register_buffer(name, tensor)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._dequantized: torch.Tensor | None = None
        self.kernel = "auto"  # or "reference": always dequantize-and-matmul

    def stored_weight(self) -> StoredWeight:
        return stored_weight_from(
            self.weight_meta, {name: getattr(self, name) for name in self.tensor_names}
        )

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 ``[out_features, in_features]``: exactly the stored weight's values."""
        if self._dequantized is None:
            self._dequantized = self.stored_weight().dequantize()
        return self._dequantized

    def drop_cache(self) -> None:
        self._dequantized = None

    def bits_per_weight(self) -> float:
        return self.stored_weight().bits_per_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.linear(self, x, self.kernel)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kind={self.weight_meta['kind']}, bits/weight={self.bits_per_weight():.3f}"
        )
