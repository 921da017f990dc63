"""Running Hessian H = (2/n) sum_t x_t x_t^T of a linear layer's inputs."""

from __future__ import annotations

import weakref

import torch


class HessianAccumulator:
    """Accumulates ``H`` ``[C, C]`` fp32 on ``device`` over batches of inputs ``[..., C]``
    (any float dtype, on ``device``; n = tokens)."""

    def __init__(self, in_features: int, device: torch.device | None = None) -> None:
        self.hessian = torch.zeros(in_features, in_features, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``[..., C]``."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.add_gram(x.T @ x, x.shape[0])

    def add_gram(self, gram: torch.Tensor, n: int) -> None:
        """Add a batch of ``n`` tokens given by its Gram matrix ``X^T X`` ``[C, C]`` fp32."""
        total = self.tokens + n
        self.hessian.mul_(self.tokens / total).add_(gram, alpha=2.0 / total)
        self.tokens = total


class GramCache:
    """``X^T X`` ``[C, C]`` fp32 of each distinct input of one batch, computed once: linears
    fed the same tensor (q/k/v, gate/up) share it. A tensor counts as the same while it is the
    same object (held weakly: the cache keeps no activation alive) and unmodified (its version
    counter unchanged); :meth:`clear` between batches.
    """

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref, int, torch.Tensor, int]] = {}

    def gram(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The Gram matrix of ``x`` ``[..., C]`` and its token count."""
        hit = self._seen.get(id(x))
        if hit is not None and hit[0]() is x and hit[1] == x._version:
            return hit[2], hit[3]
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        gram = flat.T @ flat
        self._seen[id(x)] = (weakref.ref(x), x._version, gram, flat.shape[0])
        return gram, flat.shape[0]

    def clear(self) -> None:
        self._seen.clear()
