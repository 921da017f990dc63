"""The per-sub-block scale searches of llama.cpp's reference quantizers, vectorised.

- :func:`symmetric_search` follows ``make_qx_quants`` (q4_0/q5_0 with weights, q6_k): 19
  candidate inverse scales ``-(nmax + 0.1 k) / max`` (``max``: the signed value of largest
  magnitude), each code set least-squares fitted, the best weighted fit kept.
- :func:`affine_search` follows ``make_qkx2_quants`` (q4_k/q5_k, q4_1/q5_1 with weights): the
  min-max start plus ``nstep + 1`` inverse scales ``(rmin + rdelta k + nmax) / (max - min)``,
  each code set's scale and min least-squares fitted (min clamped to <= 0), the lowest weighted
  error kept.

All functions take sub-blocks ``x`` ``[N, n]`` fp32 with weights ``w`` ``[N, n]`` and work on
every sub-block at once; rounding is round-half-to-even like ggml's ``nearest_int``.
"""

from __future__ import annotations

import torch

GROUP_MAX_EPS = 1e-15


def signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The entry of largest magnitude of each row, sign kept: ``[N, n] -> [N, 1]``."""
    return x.gather(1, x.abs().argmax(dim=1, keepdim=True))


def symmetric_search(x: torch.Tensor, w: torch.Tensor, nmax: int) -> torch.Tensor:
    """Scale ``[N]`` of the best symmetric grid ``scale * l``, ``l`` in ``[-nmax, nmax - 1]``
    (0 for an all-zero sub-block), as ``make_qx_quants(n, nmax, x, L, 1, w)`` finds it."""
    mx = signed_absmax(x)
    steps = torch.tensor([0.0] + [0.1 * k for k in range(-9, 10) if k != 0])
    safe = torch.where(mx.abs() < GROUP_MAX_EPS, torch.ones_like(mx), mx)
    iscale = -(nmax + steps) / safe  # [N, K]
    levels = (iscale[:, :, None] * x[:, None, :]).round_().clamp_(-nmax, nmax - 1)
    wx = (w * x)[:, None, :]
    sumlx = (wx * levels).sum(-1)
    suml2 = (w[:, None, :] * levels * levels).sum(-1)
    score = torch.where(suml2 > 0, sumlx * sumlx / suml2.clamp(min=1e-30),
                        torch.full_like(sumlx, -1.0))
    best = score.argmax(dim=1, keepdim=True)
    num, den = sumlx.gather(1, best)[:, 0], suml2.gather(1, best)[:, 0]
    scale = torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num))
    return torch.where(mx[:, 0].abs() < GROUP_MAX_EPS, torch.zeros_like(scale), scale)


def affine_search(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, mn)`` ``[N]`` of the best grid ``scale * l - mn``, ``l`` in ``[0, nmax]``,
    ``mn >= 0``, as ``make_qkx2_quants(n, nmax, x, w, L, &mn, .., rmin, rdelta, nstep)``."""
    lo = x.min(dim=1, keepdim=True).values.clamp(max=0)
    hi = x.max(dim=1, keepdim=True).values
    span = hi - lo
    flat = span[:, 0] <= 0
    span = torch.where(span > 0, span, torch.ones_like(span))
    steps = torch.tensor([float(nmax)] + [rmin + rdelta * k + nmax for k in range(nstep + 1)])
    iscale = steps / span  # [N, K]; candidate 0 is the min-max start
    levels = (iscale[:, :, None] * (x - lo)[:, None, :]).round_().clamp_(0, nmax)
    wl = w[:, None, :] * levels
    sum_l, sum_l2, sum_xl = wl.sum(-1), (wl * levels).sum(-1), (wl * x[:, None, :]).sum(-1)
    sum_w, sum_x = w.sum(1, keepdim=True), (w * x).sum(1, keepdim=True)
    sum_x2 = (w * x * x).sum(1, keepdim=True)
    det = sum_w * sum_l2 - sum_l * sum_l
    safe_det = torch.where(det > 0, det, torch.ones_like(det))
    scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
    low = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
    clamp_low = low > 0
    scale = torch.where(clamp_low, sum_xl / sum_l2.clamp(min=1e-30), scale)
    low = torch.where(clamp_low, torch.zeros_like(low), low)
    scale[:, 0], low[:, 0] = 1 / iscale[:, 0], lo[:, 0]
    err = _weighted_sse(scale, low, sum_w, sum_x, sum_x2, sum_l, sum_l2, sum_xl)
    err[:, 1:] = torch.where(det[:, 1:] > 0, err[:, 1:], torch.full_like(err[:, 1:], torch.inf))
    best = err.argmin(dim=1, keepdim=True)
    scale, low = scale.gather(1, best)[:, 0], low.gather(1, best)[:, 0]
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    low = torch.where(flat, lo[:, 0], low)
    return scale, -low


def _weighted_sse(scale, low, sum_w, sum_x, sum_x2, sum_l, sum_l2, sum_xl) -> torch.Tensor:
    """sum w (scale * l + low - x)^2 from the weighted sums, in fp64 (no ``[N, K, n]``
    temporary): ``[N, K]``."""
    s, m = scale.double(), low.double()
    return (s * s * sum_l2.double() + 2 * s * m * sum_l.double() - 2 * s * sum_xl.double()
            + m * m * sum_w.double() - 2 * m * sum_x.double() + sum_x2.double())


def positive_levels(
    values: torch.Tensor, nmax: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize non-negative (or signed, by magnitude) sub-block parameters ``[N, k]`` against
    one scale per row: ``(d [N], levels [N, k])`` with ``levels`` in ``[0, nmax]``.

    Without weights, llama.cpp's reference rule: ``d = max / nmax``,
    ``levels = min(nmax, round(values / d))``. With ``weights`` ``[N, k]``, the
    ``make_qp_quants`` idea: 9 candidate scales around it, codes re-rounded, the best weighted
    least-squares fit kept (the reference rule is candidate 0).
    """
    top = values.max(dim=1, keepdim=True).values
    inv = torch.where(top > 0, nmax / top.clamp(min=1e-30), torch.zeros_like(top))
    ref = torch.round(inv * values).clamp(0, nmax)
    d = (top / nmax)[:, 0]
    if weights is None:
        return d, ref
    steps = torch.tensor([0.0] + [0.1 * k for k in range(-4, 5) if k != 0])
    cand_inv = torch.where(top > 0, (nmax + steps) / top.clamp(min=1e-30),
                           torch.zeros_like(top))  # [N, K]
    levels = torch.round(cand_inv[:, :, None] * values[:, None, :]).clamp(0, nmax)
    wk = weights[:, None, :]
    sumlx = (wk * levels * values[:, None, :]).sum(-1)
    suml2 = (wk * levels * levels).sum(-1)
    fit = torch.where(suml2 > 0, sumlx / suml2.clamp(min=1e-30), torch.zeros_like(sumlx))
    fit[:, 0] = d
    diff = fit[:, :, None] * levels - values[:, None, :]
    err = (wk * diff * diff).sum(-1)
    best = err.argmin(dim=1, keepdim=True)
    index = best[:, :, None].expand(-1, 1, levels.shape[2])
    return fit.gather(1, best)[:, 0], levels.gather(1, index)[:, 0]
