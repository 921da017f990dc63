"""Channel reassembly at run time (QLLM): the input's channels split and merged before a linear.

``x'_j = (x[..., first_j] + [second_j != first_j] x[..., second_j]) / divisor_j``, ``x``
``[..., C]`` -> ``x'`` ``[..., C']``. A channel split into ``T`` copies has ``T`` entries
``(c, c, T)``; a merged pair ``(a, b)`` one entry ``(a, b, 2)``; an untouched channel
``(c, c, 1)``. The quantized linear's weight has ``C'`` columns (split columns repeated, merged
columns summed), so with no quantization ``x' W'^T`` equals ``x W^T`` up to the merged pairs'
error ``(x_a - x_b)(w_a - w_b) / 2``. Stored: two int16 indices (int32 from 32768 channels) and a
uint8 divisor per channel; run: two gathers and one fused multiply-add per token. QLLM folds the
divisors into what produces the input (the norm's gain, or ``up_proj``'s rows), which leaves them
all 1: the layer then skips the scaling and only gathers and adds.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelReassembly(nn.Module):
    """Gather-and-scale of a linear's input (see the module docstring).

    Args:
        first, second: integer ``[C']`` source channel indices into ``[0, C)``.
        divisor: integer ``[C']`` in 1..255.
        in_features: ``C``, the width of the input the layer receives.
    """

    def __init__(
        self,
        first: torch.Tensor,
        second: torch.Tensor,
        divisor: torch.Tensor,
        in_features: int,
    ) -> None:
        super().__init__()
        width = first.numel()
        if second.shape != (width,) or divisor.shape != (width,):
            raise ValueError(f"second and divisor must have shape ({width},)")
        if width and (int(min(first.min(), second.min())) < 0
                      or int(max(first.max(), second.max())) >= in_features):
            raise ValueError(f"reassembly indices must lie in [0, {in_features})")
        if width and not (1 <= int(divisor.min()) and int(divisor.max()) <= 255):
            raise ValueError("reassembly divisors must lie in 1..255")
        index = torch.int16 if in_features <= 1 << 15 else torch.int32
        self.in_features = in_features
        self.register_buffer("first", first.to(index).contiguous())
        self.register_buffer("second", second.to(index).contiguous())
        self.register_buffer("divisor", divisor.to(torch.uint8).contiguous())

    @property
    def out_features(self) -> int:
        return self.first.numel()

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``[C']`` coefficients of ``x[first]`` and ``x[second]``."""
        inv = 1.0 / self.divisor.float()
        return inv, torch.where(self.second != self.first, inv, torch.zeros_like(inv))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., C]`` -> ``[..., C']`` in ``x.dtype``.

        Entries ``j < C`` that are ``(j, j, 1)`` are a copy of ``x``'s channel ``j``: when most
        entries are (QLLM's plans keep untouched channels in place), ``x`` is copied whole and
        only the other entries are gathered; the values are the same either way.
        """
        changed, first, second, ca, cb = self._operands(x.dtype)
        gathered = x.index_select(-1, first)
        if ca is not None:
            gathered = gathered * ca
        gathered = gathered.addcmul_(x.index_select(-1, second), cb)
        if changed is None:
            return gathered
        width = self.out_features
        if width == self.in_features:
            out = x.clone()
        else:
            out = torch.cat([x, x.new_zeros(*x.shape[:-1], width - self.in_features)], dim=-1)
        return out.index_copy_(-1, changed, gathered)

    def _operands(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
        """(positions to gather or None for all, their int32 indices and ``dtype``
        coefficients, the first's None when every divisor is 1), cached until a buffer
        changes."""
        key = (dtype, self.first.device, *(t._version for t in (self.first, self.second,
                                                                 self.divisor)))
        cached = getattr(self, "_cached", None)
        if cached is None or cached[0] != key:
            ca, cb = self.coefficients()
            j = torch.arange(self.out_features, device=self.first.device)
            same = ((self.first.long() == j) & (self.second.long() == j) & (self.divisor == 1)
                    & (j < self.in_features))
            changed = torch.nonzero(~same).flatten()
            sel = changed if 2 * changed.numel() < self.out_features else None
            pick = (lambda t: t) if sel is None else (lambda t: t.index_select(0, sel))
            unscaled = bool((self.divisor == 1).all())
            cached = (key, (sel, pick(self.first).int(), pick(self.second).int(),
                            None if unscaled else pick(ca).to(dtype), pick(cb).to(dtype)))
            self._cached = cached
        return cached[1]

    def matrix(self) -> torch.Tensor:
        """fp32 ``[C, C']`` ``M`` with ``x' = x M`` (tests and weight bookkeeping)."""
        m = torch.zeros(self.in_features, self.out_features, device=self.first.device)
        cols = torch.arange(self.out_features, device=self.first.device)
        ca, cb = self.coefficients()
        m.index_put_((self.first.long(), cols), ca, accumulate=True)
        m.index_put_((self.second.long(), cols), cb, accumulate=True)
        return m

    def stored_bits(self) -> int:
        """Bits of the saved buffers."""
        per_channel = 2 * self.first.element_size() * 8 + 8
        return per_channel * self.out_features

    def meta(self) -> dict:
        return {"in_features": self.in_features, "channels": self.out_features}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, channels={self.out_features}"
