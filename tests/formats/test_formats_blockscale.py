"""Block-scaled formats: NVFP4 / MX against independent references, M1/M2 constraints."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from lowbit.formats import get_format
from lowbit.formats.blockscale import (
    PRESETS,
    BlockScaledConfig,
    compute_scales,
    fake_quantize_blocks,
    preset,
    quantize_blocks,
)
from lowbit.formats.codecs import stored_weight_from
from lowbit.formats.packed_block import PackedBlockWeight


def weights(rows=48, cols=256, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[3, 5] = 0.4  # an outlier, so blocks differ in range
    w[7, :40] = 0.0  # zero blocks
    w[9] *= 1e-4  # a tiny row
    return w


def fp4_ref_codes(x: torch.Tensor) -> torch.Tensor:
    """ml_dtypes float4_e2m1fn codes of x, saturated to +-6."""
    a = np.clip(x.numpy().astype(np.float32), -6, 6).astype(ml_dtypes.float4_e2m1fn)
    return torch.from_numpy(a.view(np.uint8).copy())


def test_nvfp4_matches_compressed_tensors_recipe():
    w = weights()
    q = quantize_blocks(w, preset("nvfp4"))
    # the recipe, with torch's float8 cast and ml_dtypes' fp4 cast as references
    g = 448.0 * 6.0 / w.abs().max()
    amax = w.view(48, -1, 16).abs().amax(-1)
    s8 = (g * (amax / 6.0)).clamp(2.0**-9, 448).to(torch.float8_e4m3fn)
    eff = s8.float() / g
    codes = fp4_ref_codes(w / eff.repeat_interleave(16, 1))
    assert torch.equal(q.scales.tensor_scale, g.reshape(1))
    assert torch.equal(q.scales.scales, s8.view(torch.uint8))
    assert torch.equal(q.codes, codes)
    deq = torch.from_numpy(codes.numpy().view(ml_dtypes.float4_e2m1fn).astype(np.float32))
    assert torch.equal(q.dequantize(), deq * eff.repeat_interleave(16, 1))


@pytest.mark.parametrize("name,elem,ref", [
    ("mxfp4", "fp4_e2m1", ml_dtypes.float4_e2m1fn),
    ("mxfp6_e2m3", "fp6_e2m3", ml_dtypes.float6_e2m3fn),
    ("mxfp8", "fp8_e4m3", ml_dtypes.float8_e4m3fn),
])
def test_mx_matches_spec(name, elem, ref):
    w = weights(cols=200)  # ragged last block of 8
    q = quantize_blocks(w, preset(name))
    fmt = get_format(elem)
    wp = torch.cat([w, w[:, -1:].expand(-1, 24)], 1).view(48, -1, 32)
    amax = wp.abs().amax(-1).double()
    emax_elem = {"fp4_e2m1": 2, "fp6_e2m3": 2, "fp8_e4m3": 8}[elem]  # OCP MX v1.0 table
    k = torch.where(amax > 0, torch.floor(torch.log2(amax)) - emax_elem, -127.0)
    scale = torch.exp2(k).float()
    e8 = scale.numpy().astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)
    assert torch.equal(q.scales.scales, torch.from_numpy(e8.copy()))
    x = (w / scale.repeat_interleave(32, 1)[:, :200]).numpy()
    codes = np.clip(x, -fmt.max, fmt.max).astype(ref).view(np.uint8)
    assert torch.equal(q.codes, torch.from_numpy(codes.copy()))


def test_m1_scales_are_powers_of_two_and_never_clip():
    w = weights()
    cfg = preset("fp4_m1")
    p = PackedBlockWeight.quantize(w, cfg)
    stored = get_format("e8m0").decode(p.scales)  # decoded from the stored bytes
    m, _ = torch.frexp(stored)
    assert bool((m == 0.5).all())
    amax = w.view(48, -1, 128).abs().amax(-1)
    assert bool((amax <= stored * 6).all())  # rounded up: no weight beyond E.max
    nz = amax > 0
    assert bool((stored[nz] < 2 * amax[nz] / 6).all())  # and by at most one binade
    # within half the widest fp4 gap (4 -> 6) of every weight: no clipping anywhere
    err = (p.dequantize() - w).abs()
    assert bool((err <= stored.repeat_interleave(128, 1)).all())


def test_m2_row_scale_real_and_ratios_powers_of_two():
    w = weights()
    cfg = BlockScaledConfig("fp4_e2m1", 32, "fp16", "m2")
    p = PackedBlockWeight.quantize(w, cfg)
    assert p.row_scales.dtype == torch.float16 and p.row_scales.shape == (48,)
    ratios = get_format("e8m0").decode(p.scales)
    m, _ = torch.frexp(ratios)
    assert bool((m == 0.5).all())
    amax = w.view(48, -1, 32).abs().amax(-1)
    eff = p.row_scales.float()[:, None] * ratios
    assert bool((amax <= eff * 6).all())  # no clipping
    assert bool((ratios.amax(1) <= 2).all())  # the largest block sits at ratio 1 (2 if fp16
    # rounded the row scale down)
    assert not torch.equal(ratios, torch.ones_like(ratios))  # ratios really vary


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_storage(name, tmp_path):
    from safetensors.torch import load_file, save_file

    w = weights(cols=200 if name.startswith("mx") else 256)
    p = PackedBlockWeight.quantize(w, preset(name))
    deq = p.dequantize()
    assert torch.equal(deq, quantize_blocks(w, preset(name)).dequantize())
    save_file(p.tensors(), tmp_path / "w.safetensors")
    back = stored_weight_from(p.meta(), load_file(tmp_path / "w.safetensors"))
    assert isinstance(back, PackedBlockWeight)
    assert torch.equal(back.dequantize(), deq)
    rel = ((deq - w).norm() / w.norm()).item()
    assert rel < 0.4 * 2.0 ** -preset(name).element_format.mbits  # measured 0.5-0.75 of that


@pytest.mark.parametrize("group_size", [-1, 0, 16, 48])
@pytest.mark.parametrize("elem", ["int4", "fp8_e4m3", "fp4_e2m1"])
def test_granularities_and_int_elements(group_size, elem):
    w = weights(cols=200)
    cfg = BlockScaledConfig(elem, group_size, "fp16", "amax")
    s = compute_scales(w, cfg)
    rb, nb, _ = cfg.block_grid(48, 200)
    assert s.scales.shape == (rb, nb) and s.per_element().shape == (48, 200)
    fq = fake_quantize_blocks(w, cfg)
    fmt = get_format(elem)
    # every fake-quantized weight is a format value times its block scale
    ratio = fq / s.per_element()
    assert torch.equal(fmt.round(ratio), ratio)
    if group_size > 0:  # per tensor/channel, the 20x outlier sets the step: no useful bound
        assert ((fq - w).norm() / w.norm()).item() < 0.2


def test_all_zero_weight_is_exact_for_every_rule():
    w = torch.zeros(4, 64)
    for cfg in PRESETS.values():
        assert torch.equal(fake_quantize_blocks(w, cfg), w)


def test_config_validation_and_dict_round_trip():
    cfg = preset("nvfp4")
    assert BlockScaledConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown BlockScaledConfig key 'block'"):
        BlockScaledConfig.from_dict({**cfg.to_dict(), "block": 3})
    with pytest.raises(ValueError, match="scale_format='e8m0'"):
        BlockScaledConfig("fp4_e2m1", 32, "fp16", "mx")
    with pytest.raises(ValueError, match="tensor_scale"):
        BlockScaledConfig("fp4_e2m1", 32, "e8m0", "mx", tensor_scale=True)
    with pytest.raises(ValueError, match="signed format"):
        BlockScaledConfig("uint4", 32)
    with pytest.raises(ValueError, match="m2. needs groups"):
        BlockScaledConfig("fp4_e2m1", -1, "fp16", "m2")
    with pytest.raises(ValueError, match="unknown block format preset"):
        preset("nvfp3")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_blocks(torch.tensor([[1.0, torch.nan]]), preset("mxfp4"))
