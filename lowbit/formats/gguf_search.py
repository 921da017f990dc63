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
    steps = torch.tensor([0.0] + [0.1 * k for k in range(-9, 10) if k != 0],
                         dtype=torch.float32, device=x.device)
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
    ``mn >= 0``, as ``make_qkx2_quants(n, nmax, x, w, L, &mn, .., rmin, rdelta, nstep)`` (and
    ``make_qkx3_quants``) find it: candidates in order, each rounding against the min of the
    best fit so far (llama.cpp updates ``min`` as it goes), a candidate kept when its weighted
    error is lower."""
    low = x.min(dim=1).values.clamp(max=0)
    hi = x.max(dim=1).values
    flat = hi <= low
    sum_w, sum_x = w.sum(1), (w * x).sum(1)
    sum_x2 = (w * x * x).sum(1)
    span = torch.where(flat, torch.ones_like(hi), hi - low)
    iscale = nmax / span
    scale = 1 / iscale
    best = _weighted_sse(scale, low, sum_w, sum_x, sum_x2, *_candidate(x, w, iscale, low, nmax)[:3])
    for k in range(nstep + 1):
        span = torch.where(flat, torch.ones_like(hi), hi - low)
        cand = torch.tensor(rmin + rdelta * k + nmax, dtype=torch.float32, device=x.device)
        sum_l, sum_l2, sum_xl, _ = _candidate(x, w, cand / span, low, nmax)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe = torch.where(det > 0, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_low = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_low > 0
        this_scale = torch.where(positive, sum_xl / sum_l2.clamp(min=1e-30), this_scale)
        this_low = torch.where(positive, torch.zeros_like(this_low), this_low)
        err = _weighted_sse(this_scale, this_low, sum_w, sum_x, sum_x2, sum_l, sum_l2, sum_xl)
        better = (det > 0) & (err < best) & ~flat
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_low, low)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -low


def _candidate(x, w, iscale, low, nmax):
    """Weighted sums of the codes ``round(iscale * (x - low))`` clamped to ``[0, nmax]``:
    ``(sum w l, sum w l^2, sum w l x, levels)``, ``[N]`` each (levels ``[N, n]``)."""
    levels = (iscale[:, None] * (x - low[:, None])).round_().clamp_(0, nmax)
    wl = w * levels
    return wl.sum(1), (wl * levels).sum(1), (wl * x).sum(1), levels


def _weighted_sse(scale, low, sum_w, sum_x, sum_x2, sum_l, sum_l2, sum_xl) -> torch.Tensor:
    """sum w (scale * l + low - x)^2 from the weighted sums, in fp64 (no ``[N, K, n]``
    temporary): ``[N, K]``."""
    s, m = scale.double(), low.double()
    return (s * s * sum_l2.double() + 2 * s * m * sum_l.double() - 2 * s * sum_xl.double()
            + m * m * sum_w.double() - 2 * m * sum_x.double() + sum_x2.double())


def positive_levels(
    values: torch.Tensor, nmax: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize non-negative sub-block parameters ``[N, k]`` against one scale per row:
    ``(d [N], levels [N, k])`` with ``levels`` in ``[0, nmax]``.

    Without weights, llama.cpp's reference rule: ``d = max / nmax``,
    ``levels = min(nmax, round(values / d))``. With ``weights`` ``[N, k]``, its
    ``make_qp_quants``: the best of 9 inverse scales ``(nmax + 0.1 k) / max``, then up to 5
    passes changing one level at a time while the weighted least-squares fit improves, and
    ``d`` that fit.
    """
    top = values.max(dim=1, keepdim=True).values
    empty = top < GROUP_MAX_EPS
    safe_top = torch.where(empty, torch.ones_like(top), top)
    if weights is None:
        inv = torch.where(empty, torch.zeros_like(top), nmax / safe_top)
        return (top / nmax)[:, 0], torch.round(inv * values).clamp(0, nmax)
    iscale = nmax / safe_top
    best = _qp_mse(values, weights, iscale, nmax, clamp=False)
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        cand = (0.1 * k + nmax) / safe_top
        mse = _qp_mse(values, weights, cand, nmax, clamp=True)
        better = mse < best
        best, iscale = torch.where(better, mse, best), torch.where(better, cand, iscale)
    levels = torch.round(iscale * values).clamp(max=nmax)
    sumlx = (weights * values * levels).sum(1)
    suml2 = (weights * levels * levels).sum(1)
    for _ in range(5):
        for i in range(values.shape[1]):
            w, x, old = weights[:, i], values[:, i], levels[:, i]
            slx, sl2 = sumlx - w * x * old, suml2 - w * old * old
            ok = (slx > 0) & (sl2 > 0)
            new = torch.round(x * sl2 / torch.where(ok, slx, torch.ones_like(slx))).clamp(max=nmax)
            slx, sl2 = slx + w * x * new, sl2 + w * new * new
            take = ok & (new != old) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[:, i] = torch.where(take, new, old)
            sumlx, suml2 = torch.where(take, slx, sumlx), torch.where(take, sl2, suml2)
    d = torch.where(suml2 > 0, sumlx / suml2.clamp(min=1e-30), torch.zeros_like(sumlx))
    zero = empty[:, 0]
    return torch.where(zero, torch.zeros_like(d), d), torch.where(empty, 0, levels)


def _qp_mse(values, weights, iscale, nmax, clamp):
    """sum w (x - l / iscale)^2 with ``l = round(iscale * x)`` (clamped to nmax if asked)."""
    levels = torch.round(iscale * values)
    if clamp:
        levels = levels.clamp(max=nmax)
    diff = values - levels / iscale
    return (weights * diff * diff).sum(1, keepdim=True)
