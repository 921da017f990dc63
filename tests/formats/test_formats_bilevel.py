"""SpQR bilevel statistics: one code path for scales and zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.formats.bilevel import BilevelStats, bilevel_quantize
from lowbit.formats.intq import minmax_params, pad_to_groups


def spqr_reference(x: np.ndarray, bits: int, beta2: int) -> np.ndarray:
    """Codes by SpQR's recipe in numpy (min-max, unrounded zero) with fp16 s, z; R % beta2 == 0."""
    maxq = 2**bits - 1
    g = x.reshape(-1, beta2, x.shape[1])
    lo, hi = g.min(1), g.max(1)
    s = ((hi - lo) / maxq).astype(np.float16).astype(np.float32)
    z = (-lo / s).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(g / s[:, None] + z[:, None]), 0, maxq)
    return q.reshape(x.shape).astype(np.uint8)


def test_matches_spqr_recipe_on_spread_statistics():
    g = torch.Generator().manual_seed(0)
    scales = torch.rand(64, 12, generator=g) * 0.05 + 0.001  # spread: the guard does not bind
    q = bilevel_quantize(scales, bits=3, beta2=16)
    assert torch.equal(q.codes, torch.from_numpy(spqr_reference(scales.numpy(), 3, 16)))
    assert q.scale.shape == (4, 12) and q.scale.dtype == torch.float16
    assert int(q.codes.max()) <= 7


@pytest.mark.parametrize("rows", [16, 37])
def test_error_bound_scales_and_zeros(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, 256, generator=g)
    scale, zero = minmax_params(pad_to_groups(w, 16)[0], 4, symmetric=False, round_zero=False)
    for stats in (scale.squeeze(-1), zero.squeeze(-1) - 7.5):  # one path; zeros may be < 0
        q = bilevel_quantize(stats, bits=3, beta2=16)
        assert q.codes.shape == stats.shape and q.scale.shape == (-(-rows // 16), 16)
        s = q.scale.float().repeat_interleave(16, 0)[:rows]
        err = (q.dequantize() - stats).abs()
        assert bool((err <= 0.5 * s + 1e-3 * stats.abs() + 1e-6).all())
        spread = stats - stats.mean()
        assert err.norm() < 0.2 * spread.norm()  # measured 0.13-0.15: uniform 3-bit on a spread


def test_constant_and_zero_groups_are_exact():
    stats = torch.zeros(32, 3)
    stats[:16, 1] = 0.0123
    stats[16:, 2] = -2.5
    d = bilevel_quantize(stats, bits=3, beta2=16).dequantize()
    assert torch.allclose(d, stats, rtol=2e-3, atol=0)
    assert torch.equal(d[:, 0], torch.zeros(32))


def test_stored_round_trip_is_exact():
    stats = torch.rand(40, 5) + 0.5
    q = bilevel_quantize(stats, bits=3, beta2=16)
    t = q.tensors("scale")
    assert t["scale_q"].numel() == -(-200 // 8) * 3  # 3-bit codes, packed
    back = BilevelStats.from_tensors(t, "scale", 40, 5, 3, 16)
    assert torch.equal(back.dequantize(), q.dequantize())


def test_validation():
    with pytest.raises(ValueError, match="fp16 range"):
        bilevel_quantize(torch.tensor([[1e6]]))
    with pytest.raises(ValueError, match=r"\[R, n\]"):
        bilevel_quantize(torch.ones(3))
    with pytest.raises(ValueError, match="fp16"):
        BilevelStats(torch.zeros(4, 2, dtype=torch.uint8), torch.zeros(1, 2), torch.zeros(1, 2),
                     3, 16)
