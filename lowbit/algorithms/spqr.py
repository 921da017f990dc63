"""SpQR (Dettmers et al. 2023, arXiv 2306.03078): GPTQ with small groups, bilevel statistics
and unstructured fp16 outliers, after the authors' ``spqr_engine.py``.

Per linear ``W [R, C]`` with Hessian ``H [C, C]``:

1. dead input columns (``diag H == 0``) are zeroed; with ``act_order`` the columns are sorted by
   decreasing ``diag H`` (the permutation is stored); ``U = chol((H + percdamp mean(diag H) I)^-1)``
   upper, ``d = diag U``;
2. outlier scale ``tau = outlier_threshold * mean_j(var_rows(W[:, j]) / d_j^2)``;
3. columns are quantized left to right (GPTQ error feedback, lazy updates every ``block_size``
   columns, rounded to whole groups). When a group of ``beta1`` columns starts, its per-row
   asymmetric min-max scale and (unrounded) zero are fitted on the updated weights, leaving out
   the weights whose exclusion lowers the group's error ``sum(((w - q(w)) / d)^2)`` by more than
   ``tau`` (stage i, skipped with ``simplified_outliers``: those weights are replaced by the row's
   mean of the others for the fit); the scales, and separately the zeros, of ``beta2``
   consecutive rows are quantized to ``qq_scale_bits``/``qq_zero_bits`` with fp16 second-level
   statistics, and the columns are quantized with those *dequantized* statistics (what is
   stored is what is used);
4. in each column, a weight with ``((w - q(w)) / d_c)^2 > tau`` is an outlier (stage ii): it
   keeps its updated value (up to fp16 rounding of its correction), the others keep their codes,
   and the column's error is propagated.

Min-max statistics come from :func:`lowbit.formats.intq.minmax_params` (asymmetric, zero not
rounded, range widened to contain 0, which the authors' quantizer does not do; with 16 weights a
group almost always straddles 0 anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.algorithms.gptq import GPTQSettings, inverse_hessian_cholesky, prepare_hessian
from lowbit.algorithms.linearwise import Solution, quantize_linearwise
from lowbit.algorithms.weight_config import IntWeightConfig
from lowbit.core.config import option, with_default
from lowbit.core.method import register
from lowbit.core.report import LayerReport
from lowbit.errors import LowbitError
from lowbit.formats.bilevel import BilevelStats, bilevel_quantize
from lowbit.formats.intq import IntGrid, dequantize, fake_quantize, minmax_params, quantize
from lowbit.formats.spqr_weight import SpQRWeight
from lowbit.kernels import spqr_cpu  # noqa: F401  (registers the CPU fast path)

_TINY = 2.0**-24  # smallest fp16 subnormal: a floor for the divisor when rounding to codes


@dataclass(frozen=True)
class SpQRConfig(GPTQSettings):
    """SpQR settings (the paper's defaults: 3-bit weights, 16x16 groups, 3-bit statistics):
    ``group_size`` is the paper's ``beta1`` (consecutive permuted input columns per first-level
    group), the weights are asymmetric, the solver settings are GPTQ's (:class:`GPTQSettings`,
    with the authors' ``percdamp`` 1.0 for SpQR; ``block_size`` is rounded down to whole groups,
    at least one; the permutation of ``act_order`` is stored)."""

    method = "spqr"
    bits: int = with_default(IntWeightConfig, "bits", 3)
    group_size: int = with_default(IntWeightConfig, "group_size", 16)
    symmetric: bool = with_default(IntWeightConfig, "symmetric", False)
    percdamp: float = with_default(GPTQSettings, "percdamp", 1.0)
    beta2: int = option(16, "rows per second-level group of the bilevel statistics")
    qq_scale_bits: int = option(3, "width of the quantized first-level scales")
    qq_zero_bits: int = option(3, "width of the quantized first-level zeros")
    outlier_threshold: float = option(0.2, "tau relative to the layer's outlier scale (inf: no "
                                           "outliers)")
    simplified_outliers: bool = option(False, "skip the leave-one-out exclusion when fitting "
                                              "statistics")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.symmetric:
            raise LowbitError("SpQR statistics are asymmetric; drop --sym (or symmetric: true)")
        for name in ("qq_scale_bits", "qq_zero_bits"):
            if not 1 <= getattr(self, name) <= 8:
                raise LowbitError(f"{name} must be between 1 and 8, got {getattr(self, name)}")
        if self.beta2 < 1:
            raise LowbitError(f"beta2 must be >= 1, got {self.beta2}")
        if not self.outlier_threshold > 0:
            raise LowbitError(
                f"outlier_threshold must be > 0 (inf disables outliers), got "
                f"{self.outlier_threshold}"
            )

    @property
    def grid(self) -> IntGrid:
        return IntGrid.from_spec(self.weight_spec, round_zero=False)


@dataclass
class SpQRResult:
    """What :func:`spqr_quantize` found for ``W [R, C]``; everything in stored column order.

    Attributes:
        codes: uint8 ``[R, C]``.
        scale_stats, zero_stats: bilevel first-level scales and zeros ``[R, n_groups]``.
        outliers: fp32 ``[R, C]``, the fp16-representable corrections added to the dense value
            at outlier positions, 0 elsewhere.
        perm: int64 ``[C]`` (stored column j = input column ``perm[j]``) or None.
        weight: fp32 ``[R, C]``, the quantized weights the error feedback used.
        threshold: ``tau`` in units of ``((w - q(w)) / d)^2``.
        percdamp: damping actually used; loo_excluded: weights left out of statistic fits.
    """

    codes: torch.Tensor
    scale_stats: BilevelStats
    zero_stats: BilevelStats
    outliers: torch.Tensor
    perm: torch.Tensor | None
    weight: torch.Tensor
    threshold: float
    percdamp: float
    loo_excluded: int


def hessian_weighted_error(w: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """``sum_k ((fq(w_k) - w_k) / d_k)^2`` over the last dim with a min-max fit of that dim.

    Args:
        w: ``[..., K]`` weights; d: ``[..., K]`` (broadcastable) diag of the inverse-Hessian
            Cholesky factor. Returns ``[...]``.
    """
    scale, zero = minmax_params(w, bits, symmetric=False, round_zero=False)
    return ((fake_quantize(w, scale, zero, bits) - w) / d).square().sum(-1)


def leave_one_out_gain(window: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """How much each weight's exclusion lowers its group's Hessian-weighted error (stage i).

    Args:
        window: ``[R, K]`` one group of every row; d: ``[K]``.
    Returns:
        ``[R, K]``: error with all K weights fitted and quantized, minus the error of the other
        K - 1 fitted and quantized without weight k (which is then not quantized at all).
    """
    k = window.shape[1]
    if k < 2:
        return torch.zeros_like(window)
    eye = torch.eye(k, dtype=torch.bool, device=window.device)
    others = torch.arange(k, device=window.device).expand(k, k)[~eye].view(k, k - 1)
    base = hessian_weighted_error(window, d, bits)  # [R]
    loo = hessian_weighted_error(window[:, others], d[others], bits)  # [R, K]
    return base[:, None] - loo


def fit_group(
    window: torch.Tensor, d: torch.Tensor, threshold: float, config: SpQRConfig
) -> tuple[BilevelStats, BilevelStats, int]:
    """Bilevel scale and zero statistics ``[R, 1]`` of one group ``window [R, K]``.

    Returns (scale stats, zero stats, number of weights left out of the fit).
    """
    excluded, bits = 0, config.grid.bits
    if not config.simplified_outliers and math.isfinite(threshold):
        keep = leave_one_out_gain(window, d, bits) <= threshold
        excluded = int((~keep).sum())
        if excluded:
            fill = (window * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
            window = torch.where(keep, window, fill)
    scale, zero = minmax_params(window, bits, symmetric=False, round_zero=False)
    flat = (window == 0).all(dim=1, keepdim=True)  # minmax_params gives these rows scale 1
    if bool(flat.any()) and not bool(flat.all()):
        scale = torch.where(flat, scale[~flat].min(), scale)  # keep the stats' range tight
    return (
        bilevel_quantize(scale, config.qq_scale_bits, config.beta2),
        bilevel_quantize(zero, config.qq_zero_bits, config.beta2),
        excluded,
    )


def _concat(stats: list[BilevelStats]) -> BilevelStats:
    first = stats[0]
    return BilevelStats(
        torch.cat([s.codes for s in stats], 1),
        torch.cat([s.scale for s in stats], 1),
        torch.cat([s.zero for s in stats], 1),
        first.bits,
        first.beta2,
    )


def spqr_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: SpQRConfig) -> SpQRResult:
    """Quantize ``weight [R, C]`` with SpQR, minimising tr(E H E^T) for ``hessian [C, C]``."""
    solver, grid = config.solver, config.grid
    w, h = prepare_hessian(weight, hessian)
    rows, cols = w.shape
    perm = torch.argsort(torch.diag(h), descending=True) if solver.act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    upper, used = inverse_hessian_cholesky(h, solver.percdamp)
    del h
    d = torch.diag(upper)
    threshold = config.outlier_threshold * float((w.var(dim=0) / d.square()).mean())
    find_outliers = math.isfinite(threshold)
    group = grid.group_width(cols)
    step = max(1, solver.block_size // group) * group
    # column-major working copy: column c is the contiguous row wt[c]
    wt = w.t().contiguous()
    codes = torch.zeros(cols, rows, dtype=torch.uint8, device=w.device)
    outliers = torch.zeros(cols, rows, device=w.device)
    errors = torch.zeros(step, rows, device=w.device)
    scale_stats, zero_stats, excluded = [], [], 0
    for start in range(0, cols, step):
        end = min(start + step, cols)
        for col in range(start, end):
            if col % group == 0:
                window = wt[col : col + group].t()  # fully updated: blocks hold whole groups
                s_stats, z_stats, n_out = fit_group(window, d[col : col + group], threshold, config)
                scale_stats.append(s_stats)
                zero_stats.append(z_stats)
                excluded += n_out
                scale, zero = s_stats.dequantize()[:, 0], z_stats.dequantize()[:, 0]
            x = wt[col]
            q = quantize(x, scale.clamp(min=_TINY), zero, grid.bits)
            used_col = dequantize(q, scale, zero)
            if find_outliers:
                is_outlier = ((x - used_col) / d[col]).square() > threshold
                correction = torch.where(is_outlier, x - used_col, 0.0).half().float()
                outliers[col] = correction
                used_col = used_col + correction
            codes[col] = q.to(torch.uint8)
            err = (x - used_col) / d[col]
            errors[col - start] = err
            wt[col] = used_col
            # rank-1 update as addmm_: addr_ takes a slow unvectorised path on CPU
            wt[col + 1 : end].addmm_(upper[col, col + 1 : end, None], err[None], alpha=-1)
        wt[end:].addmm_(upper[start:end, end:].t(), errors[: end - start], alpha=-1)
    return SpQRResult(
        codes.t().contiguous(),
        _concat(scale_stats),
        _concat(zero_stats),
        outliers.t().contiguous(),
        perm,
        wt.t().contiguous(),
        threshold,
        used,
        excluded,
    )


def spqr_solve(config: SpQRConfig, weight: torch.Tensor, hessian: torch.Tensor) -> Solution:
    res = spqr_quantize(weight, hessian, config)
    grid = config.grid
    stored = SpQRWeight.from_parts(
        res.codes,
        grid.bits,
        grid.group_width(weight.shape[1]),
        res.scale_stats,
        res.zero_stats,
        res.outliers,
        res.perm,
    )
    extra = {
        "outliers": stored.outlier_count,
        "outlier_rate": stored.outlier_rate,
        "loo_excluded": res.loo_excluded,
        "percdamp": res.percdamp,
    }
    return Solution(stored, extra)


@register(
    SpQRConfig,
    "SpQR: small groups, bilevel 3-bit stats, fp16 sparse outliers",
    distributed=True,
)
def apply_block(config: SpQRConfig, ctx) -> list[LayerReport]:
    return quantize_linearwise(ctx, config, spqr_solve, config.true_sequential)
