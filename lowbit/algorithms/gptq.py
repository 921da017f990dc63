"""GPTQ (Frantar et al. 2022): quantize columns one at a time, pushing each column's error
onto the not-yet-quantized columns through the inverse Hessian's Cholesky factor.

Follows the reference implementation: H = (2/n) sum x x^T, dead columns (diag(H) == 0) zeroed,
damping ``percdamp * mean(diag H)`` (multiplied by 10 while the Cholesky factorisation fails),
optional act-order (columns by decreasing diag(H)), lazy block updates of ``block_size``
columns, dynamic group statistics computed on the error-updated weights when a group starts, or
static groups computed up front on the original weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lowbit.algorithms.base import LayerReport, register
from lowbit.algorithms.linearwise import Solution, quantize_linearwise
from lowbit.algorithms.weight_config import IntWeightConfig
from lowbit.errors import LowbitError
from lowbit.formats.intq import IntGrid, dequantize, minmax_params, pad_to_groups, quantize
from lowbit.formats.packed_int import PackedIntWeight

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQConfig(IntWeightConfig):
    """GPTQ settings (defaults of the reference code, act-order on).

    Attributes:
        percdamp: damping as a fraction of mean(diag H).
        act_order: quantize columns by decreasing diag(H); the order is stored when groups
            follow it (dynamic groups), not when ``static_groups`` is set.
        static_groups: group statistics from the original weights before any update, in the
            original column order (no permutation stored at inference).
        block_size: columns per lazy update block.
        true_sequential: collect each sequential group's Hessians after the previous group is
            quantized (q/k/v, then o, then gate/up, then down).
    """

    method = "gptq"
    percdamp: float = 0.01
    act_order: bool = True
    static_groups: bool = False
    block_size: int = 128
    true_sequential: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.percdamp <= 10:
            raise LowbitError(f"percdamp must be in (0, 10], got {self.percdamp}")
        if self.block_size < 1:
            raise LowbitError(f"block_size must be >= 1, got {self.block_size}")


def inverse_hessian_cholesky(
    hessian: torch.Tensor, percdamp: float, max_tries: int = 6
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp I)^-1, raising damp x10 until it factorises.

    Args:
        hessian: ``[C, C]`` fp32, symmetric PSD (dead columns already set to 1 on the diagonal).
    Returns:
        ``U`` ``[C, C]`` fp32 upper triangular and the percdamp actually used.
    """
    mean_diag = torch.mean(torch.diag(hessian))
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    for _ in range(max_tries):
        damped = hessian + percdamp * mean_diag * eye
        chol, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info == 0:
                return upper, percdamp
        log.warning("Hessian not positive definite at percdamp=%g; retrying x10", percdamp)
        percdamp *= 10
    raise LowbitError(
        "the Hessian stayed indefinite after damping escalation; calibrate with more samples "
        "(--nsamples) or raise --percdamp"
    )


@dataclass
class GPTQResult:
    """Codes ``[R, C]`` uint8 in stored order, scales/zeros ``[R, n_groups]`` fp32, the stored
    permutation (``None`` when codes are in input order) and the percdamp used."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    perm: torch.Tensor | None
    percdamp: float


def prepare_hessian(
    weight: torch.Tensor, hessian: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of W ``[R, C]`` and H ``[C, C]`` in fp32 with dead input columns neutralised."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    return w, h


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: IntGrid,
    percdamp: float = 0.01,
    act_order: bool = True,
    static_groups: bool = False,
    block_size: int = 128,
) -> GPTQResult:
    """Quantize ``weight`` ``[R, C]`` on ``grid`` minimising tr(E H E^T), H ``[C, C]``."""
    w, h = prepare_hessian(weight, hessian)
    rows, cols = w.shape
    group = grid.group_width(cols)
    static = _static_params(w, grid) if static_groups else None
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    upper, used = inverse_hessian_cholesky(h, percdamp)
    n_groups = grid.num_groups(cols)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    scales = torch.zeros(rows, n_groups)
    zeros = torch.zeros(rows, n_groups)
    scale = zero = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                g = int(perm[col]) // group if perm is not None else col // group
                scale, zero = static[0][:, g : g + 1], static[1][:, g : g + 1]
            elif col % group == 0:
                window = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group]
                scale, zero = minmax_params(window, grid.bits, grid.symmetric, grid.round_zero)
                scales[:, col // group], zeros[:, col // group] = scale[:, 0], zero[:, 0]
            q = quantize(w1[:, i : i + 1], scale, zero, grid.bits)
            codes[:, col] = q[:, 0].to(torch.uint8)
            e = (w1[:, i : i + 1] - dequantize(q, scale, zero)) / u1[i, i]
            w1[:, i:] -= e @ u1[i : i + 1, i:]
            err1[:, i : i + 1] = e
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    if static is not None:
        if perm is not None:
            codes = codes[:, torch.argsort(perm)]
        return GPTQResult(codes, static[0], static[1], None, used)
    return GPTQResult(codes, scales, zeros, perm, used)


def _static_params(w: torch.Tensor, grid: IntGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero ``[R, n_groups]`` from the original weights."""
    grouped, _ = pad_to_groups(w, grid.group_width(w.shape[1]))
    scale, zero = minmax_params(grouped, grid.bits, grid.symmetric, grid.round_zero)
    return scale.squeeze(-1), zero.squeeze(-1)


def gptq_solve(config: GPTQConfig, weight: torch.Tensor, hessian: torch.Tensor) -> Solution:
    res = gptq_quantize(
        weight,
        hessian,
        config.grid,
        config.percdamp,
        config.act_order,
        config.static_groups,
        config.block_size,
    )
    stored = PackedIntWeight.from_codes(res.codes, res.scales, res.zeros, config.grid, res.perm)
    return Solution(stored, {"percdamp": res.percdamp})


@register("gptq", GPTQConfig, "GPTQ: Hessian-aware error feedback, act-order, lazy blocks")
def apply_block(config: GPTQConfig, ctx) -> list[LayerReport]:
    return quantize_linearwise(ctx, config, gptq_solve, config.true_sequential)
