"""The FP8 execution path of W4A8-FP layers: the exact FP4 -> FP8 cast that M1/M2 allow (checked
on CPU), the FP8 product's math (torch._scaled_mm also runs on CPU), and the real GPU path
(marked ``gpu``: skipped with a message without a capable GPU, never emulated)."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file
from test_zqfp import _one_torch_thread  # noqa: F401  (one torch thread here too)

from lowbit.algorithms.zqfp import SCALE_CONSTRAINTS
from lowbit.formats.blockscale import BlockScaledConfig
from lowbit.formats.packed_block import PackedBlockWeight
from lowbit.kernels import dispatch, fp8_gpu
from lowbit.nn.act_quant import ActQuantizer
from lowbit.nn.quant_linear import QuantLinear


@pytest.fixture(scope="module")
def real_weight(smollm2_2blocks):
    """A real linear weight: smollm2 block 0 gate_proj, ``[1536, 576]`` fp32."""
    tensors = load_file(str(smollm2_2blocks / "model.safetensors"))
    return tensors["model.layers.0.mlp.gate_proj.weight"].float()


def _stored(w, constraint, group=64, elem="fp4_e2m1"):
    rule, scale_format = SCALE_CONSTRAINTS[constraint]
    return PackedBlockWeight.quantize(w, BlockScaledConfig(elem, group, scale_format, rule))


@pytest.mark.parametrize("constraint", ["m1", "m2"])
def test_m1_m2_fp4_weights_cast_exactly_to_fp8(real_weight, constraint):
    stored = _stored(real_weight, constraint)
    fp8 = fp8_gpu.fp8_weight(stored)
    assert fp8 is not None and fp8.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(fp8.weight.float() * fp8.row_scale[:, None], stored.dequantize())


def test_unconstrained_fp16_group_scales_do_not_cast_exactly(real_weight):
    assert fp8_gpu.fp8_weight(_stored(real_weight, "none")) is None


def test_per_channel_fp8_weights_cast_as_they_are(real_weight):
    stored = _stored(real_weight, "m1", group=-1, elem="fp8_e4m3")
    fp8 = fp8_gpu.fp8_weight(stored)
    assert fp8 is not None
    assert torch.equal(fp8.weight.float() * fp8.row_scale[:, None], stored.dequantize())


@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_fp8_matmul_math_matches_simulated_path_on_cpu(real_weight, granularity):
    """torch._scaled_mm on CPU: same FP8 operands, fp32 accumulation, bf16 output."""
    stored = _stored(real_weight, "m2")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 576, generator=g)
    act = (
        ActQuantizer("fp8_e4m3")
        if granularity == "token"
        else ActQuantizer.static("fp8_e4m3", float(x.abs().max()))
    )
    xq, s = fp8_gpu.quantize_input(x.reshape(-1, 576), act)
    assert torch.equal(xq.float() * s, act(x).reshape(-1, 576))  # same values as simulated
    bias = torch.randn(1536, generator=g)
    y = fp8_gpu.fp8_matmul(x, act, fp8_gpu.fp8_weight(stored), bias)
    ref = QuantLinear(stored, bias, act)(x)
    assert y.shape == ref.shape
    assert (y - ref).abs().max() <= 2**-7 * ref.abs().max()  # bf16 output rounding


def test_cpu_inputs_never_take_the_fp8_path(real_weight):
    layer = QuantLinear(_stored(real_weight, "m2"), None, ActQuantizer("fp8_e4m3"))
    assert fp8_gpu.linear(layer, torch.randn(3, 576)) is None


def _require_fp8_gpu():
    ok, why = fp8_gpu.availability()
    if not ok:
        pytest.skip(f"real FP8 path not run: {why}")


@pytest.mark.gpu
@pytest.mark.parametrize("constraint", ["m1", "m2"])
def test_gpu_fp8_path_matches_simulated_and_is_timed(real_weight, constraint):
    _require_fp8_gpu()
    stored = _stored(real_weight, constraint)
    layer = QuantLinear(stored, None, ActQuantizer("fp8_e4m3"))
    x = torch.randn(4, 512, 576)
    ref = layer(x)  # simulated on CPU
    gpu = layer.to("cuda")
    xg = x.to("cuda", torch.bfloat16)
    y = gpu(xg)
    assert dispatch.path_name(gpu) == "fp8"  # the FP8 path ran
    err = (y.float().cpu() - ref).abs().max() / ref.abs().max()
    assert err < 2**-6, err  # bf16 input rounding + FP8 accumulation order + bf16 output
    w_bf16 = stored.dequantize().to("cuda", torch.bfloat16)
    for name, fn in (("fp8", lambda: gpu(xg)), ("bf16", lambda: xg @ w_bf16.T)):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        print(f"{constraint} {name}: {(time.perf_counter() - start) / 50 * 1e6:.1f} us")
