"""Trainable fake-quantized linears (LR-QAT and full QAT) and their merge into QuantLinear.

Both compute ``W_hat = s * W_int`` on a signed symmetric b-bit grid, with
``W_int = clamp(round(Z), -2**(b-1), 2**(b-1) - 1)``:

- :class:`LRQATLinear`: ``Z = Phi0 + (alpha / r) A B`` with frozen ``Phi0`` (the downcast
  ``W0 / s0``), trainable ``A`` ``[out, r]`` (zero init), ``B`` ``[r, in]`` (Kaiming uniform)
  and scales ``s``;
- :class:`QATLinear`: ``Z = W / s`` with trainable float ``W`` and ``s`` (full QAT).

The round passes the gradient straight through (:class:`FakeQuantSTE`); the clamp passes
no gradient outside the grid. The scales are trained in fp32 but used rounded to fp16 (again
straight through), which is how they are stored: :meth:`FakeQuantLinear.merged` returns a
:class:`~lowbit.nn.quant_linear.QuantLinear` whose weight is exactly the forward's ``W_hat``.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats.fixed_point import from_fixed_point8, grid_range, to_fixed_point8
from lowbit.formats.intq import IntGrid, expand_groups
from lowbit.formats.packed_int import PackedIntWeight
from lowbit.nn.quant_linear import QuantLinear

PHI_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PHIS = ("fixed_point8", "int", *PHI_DTYPES)


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest fp16 value (kept fp32) forward, identity gradient."""
    return x + (x.to(torch.float16).float() - x).detach()


def by_group(op, w: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """``op(w, scale broadcast to w)`` for ``w`` ``[R, C]`` and per-group ``scale`` ``[R, n]``
    (groups of ``group`` columns), without materialising the broadcast unless groups are
    ragged. ``op`` may be in place (``torch.Tensor.mul_``)."""
    rows, cols = w.shape
    n = scale.shape[1]
    if n == 1:
        return op(w, scale)
    if n * group == cols:
        return op(w.view(rows, n, group), scale.unsqueeze(-1)).view(rows, cols)
    return op(w, expand_groups(scale, group, cols))


def group_sum(t: torch.Tensor, group: int, n: int) -> torch.Tensor:
    """Sums of ``t`` ``[R, C]`` over each group of ``group`` columns: ``[R, n]``."""
    rows, cols = t.shape
    if n == 1:
        return t.sum(dim=1, keepdim=True)
    if n * group == cols:
        return t.view(rows, n, group).sum(dim=-1)
    return t.new_zeros(rows, n).index_add_(1, torch.arange(cols) // group, t)


class FakeQuantSTE(torch.autograd.Function):
    """``W_hat = s * clamp(round(Z), qmin, qmax)`` with a straight-through round, computed in
    place and keeping only ``round(Z)`` clamped to ``[qmin - 1, qmax + 1]`` (int8, int16 for 8
    bits) for the backward:

    - ``dZ = dW_hat * s`` where ``qmin <= round(Z) <= qmax``, else 0 (the clamp's gradient);
    - ``ds`` = per-group sums of ``dW_hat * clamp(round(Z))``.

    The same as autograd through ``s * clamp(Z + (round(Z) - Z).detach(), qmin, qmax)`` (whose
    values are exactly these), in about a third of the time and memory.
    """

    @staticmethod
    def forward(ctx, z, scale, qmin: int, qmax: int, group: int):  # noqa: D102
        w = torch.round(z).clamp_(qmin - 1, qmax + 1)  # one step outside = "clamped"
        rounded = w.to(torch.int8 if qmax < 127 else torch.int16)
        w.clamp_(qmin, qmax)
        by_group(torch.Tensor.mul_, w, scale, group)
        ctx.save_for_backward(rounded, scale)
        ctx.grid = (qmin, qmax, group)
        return w

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        rounded, scale = ctx.saved_tensors
        qmin, qmax, group = ctx.grid
        grad_z = grad_scale = None
        if ctx.needs_input_grad[1]:
            ints = rounded.float().clamp_(qmin, qmax).mul_(grad)
            grad_scale = group_sum(ints, group, scale.shape[1])
        if ctx.needs_input_grad[0]:
            grad_z = by_group(torch.mul, grad, scale, group)
            grad_z.masked_fill_((rounded < qmin) | (rounded > qmax), 0.0)
        return grad_z, grad_scale, None, None, None


def downcast(ratio: torch.Tensor, phi: str, bits: int) -> torch.Tensor:
    """``Phi0 = phi(W0 / s0)`` as stored, from ``ratio = W0 / s0`` ``[R, C]`` fp32.

    ``fixed_point8``: int8 with ``8 - bits`` fractional bits after clamping to the grid (Q4.4
    for 4 bits); ``int``: the rounded, clamped integers in int8; ``bf16``/``fp16``/``fp32``: the
    ratio cast, not clamped (as the authors' code).
    """
    if phi == "fixed_point8":
        return to_fixed_point8(ratio, bits)
    if phi == "int":
        qmin, qmax = grid_range(bits)
        return torch.clamp(torch.round(ratio), qmin, qmax).to(torch.int8)
    if phi in PHI_DTYPES:
        return ratio.to(PHI_DTYPES[phi])
    raise ValueError(f"unknown downcast '{phi}'; choose one of {', '.join(PHIS)}")


def upcast(phi0: torch.Tensor, phi: str, bits: int) -> torch.Tensor:
    """fp32 values of a stored ``Phi0`` (exact for every downcast)."""
    return from_fixed_point8(phi0, bits) if phi == "fixed_point8" else phi0.float()


class FakeQuantLinear(nn.Module, abc.ABC):
    """Base: trainable per-group scales ``s`` ``[out, n_groups]`` on a symmetric ``grid``, a
    frozen bias, and the forward ``y = x W_hat^T + b``. Subclasses define :meth:`ratio` (Z) and
    :meth:`param_groups`."""

    def __init__(self, scale: torch.Tensor, grid: IntGrid, bias: torch.Tensor | None) -> None:
        super().__init__()
        if not grid.symmetric:
            raise ValueError("fake-quantized training uses a signed symmetric grid")
        self.grid = grid
        self.qmin, self.qmax = grid_range(grid.bits)
        self.scale = nn.Parameter(scale.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    in_features: int
    out_features: int

    @abc.abstractmethod
    def ratio(self) -> torch.Tensor:
        """``Z`` ``[out, in]`` fp32, before rounding."""

    @abc.abstractmethod
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters by optimizer group (``lowrank``, ``weights``, ``scales``)."""

    def effective_scale(self) -> torch.Tensor:
        """Scales ``[out, n_groups]`` as used: clamped > 0 and rounded to fp16 (STE)."""
        return fp16_ste(self.scale.clamp(min=2**-24))

    def group_width(self) -> int:
        return self.grid.group_width(self.in_features)

    @torch.no_grad()
    def integers(self) -> torch.Tensor:
        """``W_int = clamp(round(Z))`` ``[out, in]`` fp32: the integers the forward uses."""
        return torch.clamp(torch.round(self.ratio()), self.qmin, self.qmax)

    def weight_hat(self) -> torch.Tensor:
        """``W_hat = s * W_int`` ``[out, in]`` fp32, differentiable (straight-through round)."""
        scale = self.effective_scale()
        return FakeQuantSTE.apply(self.ratio(), scale, self.qmin, self.qmax, self.group_width())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., in]`` -> ``[..., out]`` in ``x.dtype``.

        ``W_hat`` is always computed in fp32 (autocast off), so the integers are those
        :meth:`merged` stores; under autocast only the matmul runs in the lower precision.
        """
        with torch.autocast(x.device.type, enabled=False):
            w = self.weight_hat()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    @torch.no_grad()
    def merged(self) -> QuantLinear:
        """The plain quantized linear: codes ``W_int + 2**(b-1)`` and the fp16 scales the forward
        used, no adapter (its weight equals :meth:`weight_hat` exactly)."""
        w_int = self.integers()
        scale = self.effective_scale()
        codes = (w_int - self.qmin).to(torch.uint8)
        zeros = torch.full_like(scale, float(-self.qmin))
        stored = PackedIntWeight.from_codes(codes, scale, zeros, self.grid)
        return QuantLinear(stored, self.bias)

    def frozen_tensors(self) -> list[torch.Tensor]:
        """Tensors held but not trained (counted in the training memory)."""
        return [b for b in self.buffers(recurse=False) if b is not None]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.grid.bits}, group_size={self.grid.group_size}"
        )


class LRQATLinear(FakeQuantLinear):
    """LR-QAT: ``Z = Phi0 + (alpha / r) A B``; only ``A``, ``B`` and ``s`` train.

    Args:
        phi0: the stored downcast ``[out, in]`` (int8 for ``fixed_point8``/``int``, else the
            float dtype of ``phi``), see :func:`downcast`.
        phi: the downcast's name; scale: ``s0`` ``[out, n_groups]``; grid: symmetric grid.
        rank, alpha: ``A`` ``[out, rank]`` zeros, ``B`` ``[rank, in]`` Kaiming uniform
            (``a = sqrt(5)``, drawn from ``generator``), product scaled by ``alpha / rank``.
    """

    def __init__(
        self,
        phi0: torch.Tensor,
        phi: str,
        scale: torch.Tensor,
        grid: IntGrid,
        rank: int,
        alpha: float,
        bias: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(scale, grid, bias)
        self.out_features, self.in_features = phi0.shape
        self.phi = phi
        self.rank, self.alpha = rank, alpha
        self.register_buffer("phi0", phi0.detach().clone())
        self.lora_a = nn.Parameter(torch.zeros(self.out_features, rank))
        b = torch.empty(rank, self.in_features)
        nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=generator)
        self.lora_b = nn.Parameter(b)

    def ratio(self) -> torch.Tensor:
        phi0 = upcast(self.phi0, self.phi, self.grid.bits)
        return torch.addmm(phi0, self.lora_a, self.lora_b, alpha=self.alpha / self.rank)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"lowrank": [self.lora_a, self.lora_b], "scales": [self.scale]}


class QATLinear(FakeQuantLinear):
    """Full QAT: ``Z = W / s``; the float weight ``W`` ``[out, in]`` and ``s`` train."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, grid: IntGrid, bias=None) -> None:
        super().__init__(scale, grid, bias)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().float().clone())

    def ratio(self) -> torch.Tensor:
        return by_group(torch.div, self.weight, self.effective_scale(), self.group_width())

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"weights": [self.weight], "scales": [self.scale]}
