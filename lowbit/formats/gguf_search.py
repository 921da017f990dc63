"""The per-sub-block scale searches of llama.cpp's reference quantizers, vectorised.

- :func:`symmetric_search` follows ``make_qx_quants`` (q4_0/q5_0 with weights, q6_k): 19
  candidate inverse scales ``-(nmax + 0.1 k) / max`` (``max``: the signed value of largest
  magnitude), each code set least-squares fitted, the best weighted fit kept.
- :func:`affine_search` follows ``make_qkx2_quants`` (q4_k/q5_k, q4_1/q5_1 with weights): the
  min-max start plus ``nstep + 1`` inverse scales ``(rmin + rdelta k + nmax) / (max - min)``,
  each code set's scale and min least-squares fitted (min clamped to <= 0), the lowest weighted
  error kept (squared error, or with ``mad`` the absolute error of q2_k's reference).
- :func:`q3_search` follows ``make_q3_quants`` (q3_k's reference): the symmetric start
  ``-nmax / max``, then coordinate passes over the codes (weights ``x^2``).
- :func:`positive_levels` quantizes the non-negative sub-block scales and mins of the K types.

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
    return symmetric_fit(x, w, nmax)[0]


def symmetric_fit(
    x: torch.Tensor, w: torch.Tensor, nmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`symmetric_search`'s scale ``[N]`` and its codes ``l + nmax`` ``[N, n]`` fp32 (the
    ``L`` of ``make_qx_quants``; 0 for an all-zero sub-block)."""
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
    codes = levels.gather(1, best[:, :, None].expand(-1, 1, x.shape[1]))[:, 0] + nmax
    empty = mx.abs() < GROUP_MAX_EPS
    return torch.where(empty[:, 0], torch.zeros_like(scale), scale), torch.where(empty, 0, codes)


def affine_search(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`affine_fit` without the codes."""
    return affine_fit(x, w, nmax, rmin, rdelta, nstep)[:2]


def affine_fit(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
    mad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale, mn)`` ``[N]`` of the best grid ``scale * l - mn``, ``l`` in ``[0, nmax]``,
    ``mn >= 0``, as ``make_qkx2_quants(n, nmax, x, w, L, &mn, .., rmin, rdelta, nstep)`` (and
    ``make_qkx3_quants``) find it: candidates in order, each rounding against the min of the
    best fit so far (llama.cpp updates ``min`` as it goes), a candidate kept when its weighted
    error is lower (``mad``: ``sum w |error|``, else ``sum w error^2``). Returns
    ``(scale, mn, codes)``, the codes fp32 ``[N, n]`` of the fit kept (0 for a flat
    sub-block)."""
    low = x.min(dim=1).values.clamp(max=0)
    hi = x.max(dim=1).values
    flat = hi <= low
    sum_w, sum_x = w.sum(1), (w * x).sum(1)
    sum_x2 = (w * x * x).sum(1)
    span = torch.where(flat, torch.ones_like(hi), hi - low)
    iscale = nmax / span
    scale = 1 / iscale
    sums = (sum_w, sum_x, sum_x2)
    *first, levels = _candidate(x, w, iscale, low, nmax)
    best = _fit_error(x, w, scale, low, levels, sums, first, mad)
    for k in range(nstep + 1):
        span = torch.where(flat, torch.ones_like(hi), hi - low)
        cand = torch.tensor(rmin + rdelta * k + nmax, dtype=torch.float32, device=x.device)
        sum_l, sum_l2, sum_xl, cand_levels = _candidate(x, w, cand / span, low, nmax)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe = torch.where(det > 0, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_low = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_low > 0
        this_scale = torch.where(positive, sum_xl / sum_l2.clamp(min=1e-30), this_scale)
        this_low = torch.where(positive, torch.zeros_like(this_low), this_low)
        err = _fit_error(x, w, this_scale, this_low, cand_levels, sums, (sum_l, sum_l2, sum_xl),
                         mad)
        better = (det > 0) & (err < best) & ~flat
        best = torch.where(better, err, best)
        levels = torch.where(better[:, None], cand_levels, levels)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_low, low)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -low, torch.where(flat[:, None], 0, levels)


def _fit_error(x, w, scale, low, levels, sums, level_sums, mad: bool) -> torch.Tensor:
    """The weighted error ``[N]`` of the grid ``scale * levels + low`` for ``x``: absolute
    (``mad``, summed in fp32 as llama.cpp does) or squared (from the weighted sums)."""
    if mad:
        return (w * (scale[:, None] * levels + low[:, None] - x).abs()).sum(1)
    return _weighted_sse(scale, low, *sums, *level_sums)


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
    sumlx, suml2 = _refine_levels(values, weights, levels, None, nmax, need_sl2=True)
    d = torch.where(suml2 > 0, sumlx / suml2.clamp(min=1e-30), torch.zeros_like(sumlx))
    zero = empty[:, 0]
    return torch.where(zero, torch.zeros_like(d), d), torch.where(empty, 0, levels)


def q3_search(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants``'s sibling ``make_q3_quants(n, nmax, x, L, true)``: codes
    ``round(-nmax / max * x)`` in ``[-nmax, nmax - 1]`` (``max`` the signed value of largest
    magnitude), improved one code at a time for up to 5 passes while the ``x^2``-weighted
    least-squares fit gets better. Returns ``(scale [N], codes l + nmax [N, n] fp32)``; scale 0
    and codes 0 for an all-zero sub-block."""
    mx = signed_absmax(x)
    empty = mx.abs() < GROUP_MAX_EPS
    iscale = -nmax / torch.where(empty, torch.ones_like(mx), mx)
    levels = (iscale * x).round_().clamp_(-nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = _refine_levels(x, w, levels, -nmax, nmax - 1, need_sl2=False)
    d = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1), torch.zeros_like(sumlx))
    return torch.where(empty[:, 0], 0, d), torch.where(empty, 0, levels + nmax)


def _refine_levels(
    values: torch.Tensor, weights: torch.Tensor, levels: torch.Tensor, lo: int | None, hi: int,
    need_sl2: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's coordinate passes (``make_qp_quants``, ``make_q3_quants``): up to 5 times,
    each code in turn moves to ``round(x * sl2 / slx)`` (clamped to ``[lo, hi]``) of the fit
    without it when that raises ``sumlx^2 / suml2``. Updates ``levels`` ``[N, n]`` in place;
    returns the final ``(sumlx, suml2)`` ``[N]``. A code is tried where ``slx > 0`` (and, with
    ``need_sl2``, ``sl2 > 0``); a pass that changes nothing leaves the next unchanged, so 5 full
    passes equal llama.cpp's early exit."""
    sumlx = (weights * values * levels).sum(1)
    suml2 = (weights * levels * levels).sum(1)
    for _ in range(5):
        for i in range(values.shape[1]):
            w, x, old = weights[:, i], values[:, i], levels[:, i]
            slx, sl2 = sumlx - w * x * old, suml2 - w * old * old
            ok = (slx > 0) & (sl2 > 0) if need_sl2 else slx > 0
            new = torch.round(x * sl2 / torch.where(ok, slx, torch.ones_like(slx))).clamp(lo, hi)
            slx, sl2 = slx + w * x * new, sl2 + w * new * new
            take = ok & (new != old) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[:, i] = torch.where(take, new, old)
            sumlx, suml2 = torch.where(take, slx, sumlx), torch.where(take, sl2, suml2)
    return sumlx, suml2


def _qp_mse(values, weights, iscale, nmax, clamp):
    """sum w (x - l / iscale)^2 with ``l = round(iscale * x)`` (clamped to nmax if asked)."""
    levels = torch.round(iscale * values)
    if clamp:
        levels = levels.clamp(max=nmax)
    diff = values - levels / iscale
    return (weights * diff * diff).sum(1, keepdim=True)
