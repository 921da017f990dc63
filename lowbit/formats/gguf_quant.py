"""Round-to-nearest onto llama.cpp's block types, following its reference quantizers.

Without importance, q8_0/q4_0/q4_1/q5_0/q5_1 reproduce llama.cpp's ``quantize_row_*_ref``
(and gguf-py's ``quantize``) byte for byte; q4_k/q5_k/q6_k follow ``quantize_row_q*_K_ref``
(``make_qkx2_quants`` / ``make_qx_quants`` per sub-block, then 6-/8-bit sub-block scales
against fp16 ``d`` and ``dmin``); q3_k/q2_k follow ``quantize_row_q3_K_ref`` (``make_q3_quants``
per 16 elements, 6-bit signed scales) and ``quantize_row_q2_K_ref`` (``make_qkx2_quants`` with
absolute error per 16 elements, 4-bit scales and mins). With a per-column importance ``[C]``
(an imatrix, or GPTQ's Hessian diagonal) they follow llama.cpp's ``quantize_q*`` with
``quant_weights``: element weights ``importance * sqrt(sigma2 + x^2)``, the weighted searches,
and (K types) weighted sub-scale quantization. Every type ends by rounding each element to
the nearest point of the grid actually stored (fp16 ``d``, quantized sub-scales), as
llama.cpp's K quantizers do.
"""

from __future__ import annotations

import torch

from lowbit.formats.gguf_layout import QK_K, BlockFields, GGMLType, element_params
from lowbit.formats.gguf_search import (
    affine_fit,
    affine_search,
    positive_levels,
    q3_search,
    signed_absmax,
    symmetric_fit,
    symmetric_search,
)

# (rmin, rdelta, nstep) of make_qkx2_quants in the reference K quantizers, and of
# make_qkx3_quants in the importance-weighted ones
AFFINE_STEPS = {"q4_k": (-1.0, 0.1, 20), "q5_k": (-0.5, 0.1, 15)}
WEIGHTED_AFFINE_STEPS = (-0.9, 0.05, 36)


def round_to_grid(
    x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, t: GGMLType
) -> torch.Tensor:
    """uint8 codes of the grid points ``scale * (q - zero) + offset`` nearest to ``x`` (all
    broadcastable to ``[R, n]``); code ``zero`` where the scale is 0."""
    target = x if offset is None else x - offset
    zero_scale = scale == 0
    ratio = target / torch.where(zero_scale, torch.ones_like(scale), scale)
    q = (torch.round(ratio) + t.zero).clamp(0, t.qmax)
    return torch.where(zero_scale, torch.full_like(q, float(t.zero)), q).to(torch.uint8)


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


def _round_away(v: torch.Tensor) -> torch.Tensor:
    """C's ``roundf`` (half away from zero), as gguf-py's ``np_roundf`` computes it."""
    a = v.abs()
    fl = a.floor()
    return torch.sign(v) * (fl + torch.floor(2 * (a - fl)))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, 1, d))


def legacy_reference(w: torch.Tensor, t: GGMLType) -> BlockFields:
    """llama.cpp's ``quantize_row_{q8_0,q4_0,q4_1,q5_0,q5_1}_ref`` for ``w`` ``[R, C]``:
    codes from the fp32 scale, the scale stored as fp16."""
    rows, cols = w.shape
    x = w.view(rows, cols // 32, 32)
    if t.name == "q8_0":
        d = x.abs().amax(dim=-1, keepdim=True) / 127
        q = _round_away(x * _inverse(d)) + 128
        return BlockFields(q.to(torch.uint8).view(rows, cols), _f16(d[..., 0]))
    if not t.affine:
        d = signed_absmax(x.reshape(-1, 32)).view(rows, -1, 1) / -t.zero
        q = torch.trunc(x * _inverse(d) + (t.zero + 0.5)).clamp(0, t.qmax)
        return BlockFields(q.to(torch.uint8).view(rows, cols), _f16(d[..., 0]))
    lo = x.amin(dim=-1, keepdim=True)
    d = (x.amax(dim=-1, keepdim=True) - lo) / t.qmax
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, t.qmax)
    return BlockFields(q.to(torch.uint8).view(rows, cols), _f16(d[..., 0]), _f16(lo[..., 0]))


def element_weights(
    x: torch.Tensor, importance: torch.Tensor, sigma_scale: float, span: int | None = None
) -> torch.Tensor:
    """llama.cpp's imatrix element weights ``importance * sqrt(sigma2 + x^2)`` for rows ``x``
    ``[R, C]``, ``sigma2 = sigma_scale * mean(x^2)`` per row (or, with ``span``, per run of
    ``span`` elements: q2_k/q3_k take it per super-block)."""
    rows, cols = x.shape
    runs = (x * x).view(rows, -1, span or cols)
    sigma2 = (sigma_scale * runs.mean(dim=-1, keepdim=True)).expand_as(runs).reshape(rows, cols)
    return _floored(importance)[None, :] * torch.sqrt(sigma2 + x * x)


def _floored(importance: torch.Tensor) -> torch.Tensor:
    """fp32 ``[C]`` importance where a zero column still counts a little."""
    importance = importance.float()
    return importance.clamp(min=1e-10 * importance.mean().clamp(min=1e-30))


def legacy_weighted(w: torch.Tensor, t: GGMLType, importance: torch.Tensor) -> BlockFields:
    """``quantize_q{4_0,4_1,5_0,5_1}`` with quant_weights: weighted searches per block."""
    rows, cols = w.shape
    weights = element_weights(w, importance, 1.0).reshape(-1, 32)
    x = w.reshape(-1, 32)
    if t.affine:
        scale, mn = affine_search(x, weights, t.qmax, *WEIGHTED_AFFINE_STEPS)
        f = BlockFields(_no_codes(w), _f16(scale.view(rows, -1)), _f16(-mn.view(rows, -1)))
    else:
        f = BlockFields(_no_codes(w), _f16(symmetric_search(x, weights, t.zero).view(rows, -1)))
    return _rounded(w, t, f)


def _no_codes(w: torch.Tensor) -> torch.Tensor:
    """An empty uint8 code tensor on ``w``'s device, for fields whose codes :func:`_rounded`
    sets."""
    return w.new_empty(0, dtype=torch.uint8)


def _rounded(w: torch.Tensor, t: GGMLType, f: BlockFields) -> BlockFields:
    """``f`` with codes re-rounded to the nearest point of its stored grid."""
    f.q = round_to_grid(w, *element_params(t, f), t)
    return f


def k_affine(w: torch.Tensor, t: GGMLType, importance: torch.Tensor | None) -> BlockFields:
    """q4_k/q5_k: per 32-element sub-block an affine search, then 6-bit scales and mins against
    fp16 ``d`` and ``dmin`` per 256-element super-block."""
    rows, cols = w.shape
    x = w.reshape(-1, 32)
    if importance is None:
        av = torch.sqrt((x * x).mean(dim=1, keepdim=True))
        weights = av + x.abs()
        steps = AFFINE_STEPS[t.name]
    else:
        weights = element_weights(w, importance, 2.0, QK_K).reshape(-1, 32)
        steps = WEIGHTED_AFFINE_STEPS
    scale, mn = affine_search(x, weights, t.qmax, *steps)
    per = QK_K // 32
    sub_w = None if importance is None else weights.sum(dim=1).view(-1, per)
    d, ls = positive_levels(scale.view(-1, per), 63, sub_w)
    dmin, lm = positive_levels(mn.view(-1, per), 63, sub_w)
    f = BlockFields(_no_codes(w), _f16(d.view(rows, -1)), _f16(dmin.view(rows, -1)),
                    ls.to(torch.uint8).view(rows, -1), lm.to(torch.uint8).view(rows, -1))
    return _rounded(w, t, f)


def q6_k(w: torch.Tensor, t: GGMLType, importance: torch.Tensor | None) -> BlockFields:
    """q6_k: per 16-element sub-block a symmetric search (``make_qx_quants``, nmax 32), then
    int8 sub-scales against fp16 ``d = -max_scale / 128`` per super-block."""
    rows, cols = w.shape
    x = w.reshape(-1, 16)
    if importance is None:
        weights = x * x
    else:  # llama.cpp's quantize_row_q6_K_impl weights by the importance alone
        weights = _floored(importance).expand(rows, cols).reshape(-1, 16)
    scales = symmetric_search(x, weights, 32).view(-1, QK_K // 16)
    top = signed_absmax(scales)
    tiny = top.abs() < 1e-15
    iscale = torch.where(tiny, torch.zeros_like(top), -128 / torch.where(tiny, 1, top))
    d = torch.where(tiny, torch.zeros_like(top), 1 / torch.where(tiny, 1, iscale))
    sc = torch.round(iscale * scales).clamp(-128, 127).to(torch.int8)
    f = BlockFields(_no_codes(w), _f16(d.view(rows, -1)), sc=sc.view(rows, -1))
    return _rounded(w, t, f)


def _requantized(w: torch.Tensor, t: GGMLType, f: BlockFields, codes: torch.Tensor) -> BlockFields:
    """``f`` with codes rounded to its stored grid, keeping the search's ``codes`` (any shape
    of ``R * C`` elements) where a sub-block's stored scale is 0 (as q2_k/q3_k's quantizers
    skip those sub-blocks)."""
    scale, offset = element_params(t, f)
    q = round_to_grid(w, scale, offset, t)
    f.q = torch.where(scale == 0, codes.reshape(q.shape).to(torch.uint8), q)
    return f


def q3_k(w: torch.Tensor, t: GGMLType, importance: torch.Tensor | None) -> BlockFields:
    """q3_k: per 16-element sub-block a signed scale (``make_q3_quants``, or with importance
    the weighted ``make_qx_quants``, nmax 4), then 6-bit signed sub-scales against fp16 ``d``
    per super-block (``-max / 32`` rounded, or with importance a weighted ``make_qx_quants``
    fit, nmax 32)."""
    rows, cols = w.shape
    x = w.reshape(-1, 16)
    per = QK_K // 16
    if importance is None:
        scales, codes = q3_search(x, 4)
        scales = scales.view(-1, per)
        top = signed_absmax(scales)
        iscale = -32 / torch.where(top == 0, torch.ones_like(top), top)
        levels = torch.round(iscale * scales).clamp(-32, 31)
        d = torch.where(top == 0, torch.zeros_like(top), 1 / iscale)
        levels = torch.where(top == 0, -32, levels)
    else:
        weights = element_weights(w, importance, 2.0, QK_K).reshape(-1, 16)
        scales, codes = symmetric_fit(x, weights, 4)
        d, levels = symmetric_fit(scales.view(-1, per), weights.sum(1).view(-1, per), 32)
        levels = levels - 32
    f = BlockFields(_no_codes(w), _f16(d.view(rows, -1)), sc=levels.to(torch.int8).view(rows, -1))
    return _requantized(w, t, f, codes)


def q2_k(w: torch.Tensor, t: GGMLType, importance: torch.Tensor | None) -> BlockFields:
    """q2_k: per 16-element sub-block an affine search (``make_qkx2_quants`` on ``|x|``-weighted
    absolute error, or with importance the weighted squared-error search), then 4-bit scales
    and mins against fp16 ``d`` and ``dmin`` per super-block."""
    rows, cols = w.shape
    x = w.reshape(-1, 16)
    per = QK_K // 16
    if importance is None:
        scale, mn, codes = affine_fit(x, x.abs(), 3, -0.5, 0.1, 15, mad=True)
        sub_w = None
    else:
        weights = element_weights(w, importance, 1.0, QK_K).reshape(-1, 16)
        scale, mn, codes = affine_fit(x, weights, 3, *WEIGHTED_AFFINE_STEPS)
        sub_w = weights.sum(1).view(-1, per)
    d, ls = positive_levels(scale.view(-1, per), 15, sub_w)
    dmin, lm = positive_levels(mn.view(-1, per), 15, sub_w)
    f = BlockFields(_no_codes(w), _f16(d.view(rows, -1)), _f16(dmin.view(rows, -1)),
                    ls.to(torch.uint8).view(rows, -1), lm.to(torch.uint8).view(rows, -1))
    return _requantized(w, t, f, codes)


def quantize_fields(
    w: torch.Tensor, t: GGMLType, importance: torch.Tensor | None = None
) -> BlockFields:
    """The fields of ``w`` fp32 ``[R, C]`` rounded to nearest on type ``t`` (``C`` a multiple of
    ``t.block``), with an optional per-column ``importance`` ``[C]`` (>= 0)."""
    w = w.detach().float().contiguous()
    if t.name in AFFINE_STEPS:
        return k_affine(w, t, importance)
    if t.name == "q6_k":
        return q6_k(w, t, importance)
    if t.name == "q3_k":
        return q3_k(w, t, importance)
    if t.name == "q2_k":
        return q2_k(w, t, importance)
    if importance is None or t.name == "q8_0":  # llama.cpp's q8_0 ignores quant_weights
        return legacy_reference(w, t)
    return legacy_weighted(w, t, importance)

