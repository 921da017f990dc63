"""Running Hessian H = (2/n) sum_t x_t x_t^T of a linear layer's inputs."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Accumulates ``H`` ``[C, C]`` fp32 on ``device`` over batches of inputs ``[..., C]``
    (any float dtype, on ``device``; n = tokens)."""

    def __init__(self, in_features: int, device: torch.device | None = None) -> None:
        self.hessian = torch.zeros(in_features, in_features, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        total = self.tokens + n
        self.hessian *= self.tokens / total
        x = x * (2.0 / total) ** 0.5
        self.hessian.addmm_(x.T, x)
        self.tokens = total
