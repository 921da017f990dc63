"""A low-rank add-on to a linear layer: ``y += (x V^T) U^T`` (LoRC, adapters)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.bits import lowrank_parts


class LowRank(nn.Module):
    """Low-rank term ``x -> (x V^T) U^T`` with stored factors (fp16 by default).

    Args:
        u: ``[out_features, rank]``; v: ``[rank, in_features]``; both kept as buffers in the
            dtype given (what is saved is what the forward uses).
    """

    def __init__(self, u: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
            raise ValueError(
                f"low-rank factors must be [out, r] and [r, in], got "
                f"{tuple(u.shape)} and {tuple(v.shape)}"
            )
        # row-major copies: what a reload gives, so the forward's float results match it exactly
        self.register_buffer("u", u.detach().clone(memory_format=torch.contiguous_format))
        self.register_buffer("v", v.detach().clone(memory_format=torch.contiguous_format))

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def weight(self) -> torch.Tensor:
        """fp32 ``[out, in]`` = ``U V`` (the dense matrix the add-on represents)."""
        return self.u.float() @ self.v.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., in]`` -> ``[..., out]`` in ``x.dtype``."""
        return (x @ self.v.to(x.dtype).T) @ self.u.to(x.dtype).T

    def stored_bits(self) -> int:
        rows, cols = self.u.shape[0], self.v.shape[1]
        bits = self.u.element_size() * 8
        return sum(p.stored_bits() for p in lowrank_parts(rows, cols, self.rank, bits))

    def meta(self) -> dict:
        return {"rank": self.rank, "dtype": str(self.u.dtype).removeprefix("torch.")}

    def extra_repr(self) -> str:
        return f"rank={self.rank}, dtype={self.u.dtype}"
