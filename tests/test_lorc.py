"""LoRC: the low-rank SVD of the weight error, its bit cost, and its effect on a real block."""

from __future__ import annotations

import pytest
import torch
from test_zqfp import _one_torch_thread  # noqa: F401  (one torch thread here too)

from lowbit import api
from lowbit.algorithms.lorc import lorc, lorc_factors
from lowbit.data.corpora import load_text
from lowbit.formats.bits import bits_per_weight, block_parts, lowrank_parts
from lowbit.formats.blockscale import BlockScaledConfig
from lowbit.formats.packed_block import PackedBlockWeight
from lowbit.nn.lowrank import LowRank
from lowbit.nn.quant_linear import QuantLinear

CALIB = api.CalibSpec(nsamples=8, seqlen=128, batch_size=4)


def test_factors_are_the_best_rank_m_approximation_in_fp16():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(96, 64, generator=g) @ torch.diag(torch.logspace(0, -2, 64))
    errs = []
    for rank in (1, 4, 8, 32):
        u, v = lorc_factors(e, rank)
        assert u.shape == (96, rank) and v.shape == (rank, 64) and u.dtype == torch.float16
        s = torch.linalg.svdvals(e.double())
        best = float(s[rank:].square().sum().sqrt())  # Eckart-Young
        got = float((e - u.float() @ v.float()).norm())
        assert got == pytest.approx(best, rel=1e-2)
        errs.append(got)
    assert errs == sorted(errs, reverse=True)
    with pytest.raises(ValueError, match="rank"):
        lorc_factors(e, 65)


def test_lorc_lowers_weight_error_of_fp4_weight():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(128, 256, generator=g) * 0.02
    stored = PackedBlockWeight.quantize(w, BlockScaledConfig("fp4_e2m1", 64, "e8m0", "m1"))
    layer = QuantLinear(stored, None, None, lorc(w, stored.dequantize(), 8))
    assert (w - layer.effective_weight()).norm() < (w - stored.dequantize()).norm()
    x = torch.randn(4, 256, generator=g)
    expected = (
        x @ stored.dequantize().T + (x @ layer.lowrank.v.float().T) @ layer.lowrank.u.float().T
    )
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_bits_include_lowrank_factors_at_4096_rank_8():
    rows = cols = 4096
    cfg = BlockScaledConfig("fp4_e2m1", 128, "e8m0", "m1")
    stored = PackedBlockWeight(  # synthetic codes: only the sizes matter here
        rows,
        cols,
        cfg,
        torch.zeros(rows * cols // 2, dtype=torch.uint8),
        torch.full((rows, cols // 128), 127, dtype=torch.uint8),
    )
    rank = 8
    lowrank = LowRank(
        torch.zeros(rows, rank, dtype=torch.float16), torch.zeros(rank, cols, dtype=torch.float16)
    )
    plain, with_lorc = QuantLinear(stored), QuantLinear(stored, None, None, lowrank)
    assert plain.bits_per_weight() == pytest.approx(4 + 8 / 128)
    assert with_lorc.bits_per_weight() - plain.bits_per_weight() == pytest.approx(0.0625)
    parts = block_parts(cfg, rows, cols) + lowrank_parts(rows, cols, rank)
    assert with_lorc.bits_per_weight() == pytest.approx(bits_per_weight(rows * cols, parts))


LORC_RANK = 32  # rank 8 lowers this 2-block model's KLD by only 11-12%: too close to call


@pytest.fixture(scope="module")
def lorc_model(smollm2_2blocks):
    loaded = api.load_model(str(smollm2_2blocks))
    cfg = {"group_size": 64, "scale_constraint": "m2", "lorc_rank": LORC_RANK}
    result = api.quantize(loaded, api.build_config("zqfp", cfg), CALIB, progress=False)
    return loaded, result


def test_lorc_lowers_weight_and_output_error_on_real_block(lorc_model):
    _, result = lorc_model
    assert len(result.layers) == 14
    for r in result.layers:
        # measured at most 0.855 (weight) and 0.953 (Hessian-weighted), 1 and 2 threads alike
        assert r.weight_rel_err < 0.9 * r.extra["weight_rel_err_before_lorc"], r.name
        assert r.hessian_rel_err < 0.98 * r.extra["hessian_rel_err_before_lorc"], r.name


def test_lorc_lowers_model_output_error(lorc_model, smollm2_2blocks):
    """KL divergence to the base on 8 x 256 held-out Brown tokens, the same quantized model with
    and without its LoRC factors (removing them in place keeps GPTQ's roundings fixed).

    Measured ratios (with / without) 0.714 at one thread and 0.732 at two; a 25-token sentence,
    the earlier setting, swung by 40% between thread counts (GPTQ turns float-order differences
    into other roundings) and LoRC lost there at one thread (0.0236 vs 0.0229). The bound 0.85
    leaves six times the thread-count spread.
    """
    loaded, _ = lorc_model
    base = api.load_model(str(smollm2_2blocks))
    text = load_text("brown")[:40000]
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, : 8 * 256].reshape(8, 256)
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    with torch.inference_mode():
        ref = base.model(ids).logits.log_softmax(-1)
        with_lorc = loaded.model(ids).logits.log_softmax(-1)
        saved = [m.lowrank for m in layers]
        try:
            for m in layers:
                m.lowrank = None
            without = loaded.model(ids).logits.log_softmax(-1)
        finally:
            for m, lr in zip(layers, saved, strict=True):
                m.lowrank = lr

    def kld(logp):
        return float((ref.exp() * (ref - logp)).sum(-1).mean())

    assert kld(with_lorc) < 0.85 * kld(without), (kld(with_lorc), kld(without))
