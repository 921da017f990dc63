"""Activation fake-quantization: exact against the formats layer and torch's FP8 casts."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats.blockscale import BlockScaledConfig
from lowbit.formats.element import get_format
from lowbit.formats.packed_block import PackedBlockWeight
from lowbit.nn.act_quant import ActQuantizer, observe_absmax
from lowbit.nn.quant_linear import QuantLinear


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 64, generator=g) * torch.logspace(-3, 2, 64)  # wide per-channel range
    x[0, 1] = 0  # an all-zero token
    x[1, 2, 7] = 900.0  # an outlier channel
    return x


def _torch_fp8(y: torch.Tensor, name: str) -> torch.Tensor:
    dtype = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[name]
    limit = get_format(name).max
    return y.clamp(-limit, limit).to(dtype).float()  # saturating, round to nearest even


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "int8"])
def test_per_token_equals_format_round_and_torch(fmt):
    x = _inputs()
    q = ActQuantizer(fmt, "token")
    e = get_format(fmt)
    amax = x.abs().amax(dim=-1, keepdim=True)
    s = torch.where(amax > 0, amax / e.max, torch.ones_like(amax))
    assert torch.equal(q(x), e.round(x / s) * s)
    ref = _torch_fp8(x / s, fmt) if fmt != "int8" else torch.round(x / s).clamp(-128, 127)
    assert torch.equal(q(x), ref * s)
    assert torch.equal(q(x)[0, 1], torch.zeros(64))
    # each token's largest magnitude is representable exactly (it maps onto E.max)
    assert torch.allclose(q(x).abs().amax(-1), x.abs().amax(-1), rtol=1e-6)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_per_tensor_static_scale(fmt):
    x = _inputs(1)
    q = ActQuantizer.static(fmt, float(x.abs().max()))
    s = x.abs().max() / get_format(fmt).max
    assert q.scale.shape == (1,) and torch.equal(q.scale, s.reshape(1))
    assert torch.equal(q(x), get_format(fmt).round(x / s) * s)
    # values beyond the calibrated range saturate instead of overflowing
    e = get_format(fmt)
    big = q(x * 4)
    assert float(big.max()) == pytest.approx(e.max * float(s), rel=1e-6)
    assert float(big.min()) == pytest.approx(e.min * float(s), rel=1e-6)  # int8: -128 s


def test_quantization_changes_values_and_keeps_dtype():
    x = _inputs().to(torch.bfloat16)
    y = ActQuantizer("fp8_e4m3")(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    x32 = _inputs()
    assert not torch.equal(ActQuantizer("fp8_e4m3")(x32), x32)
    assert not torch.equal(ActQuantizer("fp8_e4m3")(x32), ActQuantizer("int8")(x32))


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="signed format"):
        ActQuantizer("uint8")
    with pytest.raises(ValueError, match="granularity"):
        ActQuantizer("int8", "channel")
    with pytest.raises(ValueError, match="exactly"):
        ActQuantizer("int8", "tensor")


def test_observer_records_absmax_over_batches_and_removes_hooks():
    lin = torch.nn.Linear(8, 4)
    xs = [torch.randn(2, 3, 8) for _ in range(3)]
    with observe_absmax({"lin": lin}) as amax:
        for x in xs:
            lin(x)
    assert amax["lin"] == max(float(x.abs().max()) for x in xs)
    lin(torch.full((1, 8), 1e6))
    assert amax["lin"] < 1e6  # hooks are gone once the context closes


def test_quant_linear_multiplies_the_quantized_input():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * 0.05
    stored = PackedBlockWeight.quantize(w, BlockScaledConfig("fp4_e2m1", 32, "fp16", "m2"))
    act = ActQuantizer("fp8_e4m3")
    layer = QuantLinear(stored, torch.randn(48, generator=g), act)
    x = _inputs()
    expected = torch.nn.functional.linear(act(x), stored.dequantize(), layer.bias)
    assert torch.equal(layer(x), expected)
    plain = QuantLinear(stored, layer.bias)
    assert not torch.equal(layer(x), plain(x))
    assert layer.addon_meta()["act_quant"]["execution_cpu"].startswith("simulated")
