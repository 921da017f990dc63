"""CPU fast paths (int4pack, int8pack, dense bf16, SpQR int4 + sparse) against the reference
dequantize-then-matmul, on awkward shapes: odd widths, row counts not multiples of 16, ragged
groups, act-order permutations, asymmetric (integer and real) zero points.

Tolerance: the fast paths multiply bf16 activations by weights whose statistics are rounded to
bf16, with bf16 outputs, so they are held against the exact fp32 product of the same bf16 input
(``x.float() @ W^T``) at a relative Frobenius error of ``TOL = 5e-3`` (bf16's unit roundoff is
``2**-9 = 2e-3``; the dense bf16 reference itself sits near 2e-3 here). A wrong column order,
group map or zero point gives errors of order 1.

Also the one kernel-choosing mechanism: SpQR's tiled fp32 path and the FP8 GPU path are planned
kernels like the others, activation quantization runs before a kernel unless it quantizes its
own input, and a QuantLinear's run-time state is its declared fields only, never saved.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.algorithms.spqr import SpQRConfig, spqr_solve
from lowbit.formats.blockscale import preset
from lowbit.formats.intq import IntGrid, rtn_quantize
from lowbit.formats.packed_block import PackedBlockWeight
from lowbit.formats.packed_int import PackedIntWeight
from lowbit.kernels import dispatch, fp8_gpu, reference, spqr_cpu
from lowbit.kernels import triton as triton_kernels
from lowbit.kernels.int4_cpu import layout_for
from lowbit.nn.act_quant import ActQuantizer
from lowbit.nn.lowrank import LowRank
from lowbit.nn.quant_linear import QuantLinear

TOL = 5e-3


def _int_layer(rows, cols, bits, group, symmetric=True, round_zero=True, perm=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05 + 0.01  # offset: zeros away from mid code
    grid = IntGrid(bits, group, symmetric, round_zero)
    p = torch.randperm(cols, generator=g) if perm else None
    stored = PackedIntWeight.from_codes(
        *rtn_quantize(w if p is None else w[:, p], grid), grid, perm=p
    )
    return QuantLinear(stored, torch.randn(rows, generator=g))


def _spqr_layer(rows, cols, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[torch.rand(rows, cols, generator=g) < 0.01] *= 8
    x = torch.randn(4 * cols, cols, generator=g) * torch.exp(torch.randn(cols, generator=g))
    h = 2 * x.T @ x / x.shape[0]
    return QuantLinear(spqr_solve(SpQRConfig(**kw), w, h).stored, torch.randn(rows, generator=g))


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def _check(layer: QuantLinear, path: str, lead=(3, 5)) -> float:
    x = torch.randn(*lead, layer.in_features).bfloat16()
    assert dispatch.prepare(layer, torch.bfloat16) == path
    w = layer.stored_weight().dequantize()
    oracle = x.float() @ w.T + (0 if layer.bias is None else layer.bias)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (*lead, layer.out_features)
    err = _rel_err(y, oracle)
    assert err < TOL, f"{path}: relative error {err:.2e}"
    assert layer._dequantized is None  # the fast path needs no fp32 copy of the weight
    layer.set_kernel_mode("reference")
    assert _rel_err(layer(x), oracle) < TOL  # the oracle path is still there
    layer.set_kernel_mode("auto")
    return err


INT_CASES = [  # rows, cols, bits, group, symmetric, round_zero, perm, expected path
    (40, 96, 4, 32, True, True, False, "int4"),
    (37, 100, 4, 64, False, True, True, "int4"),  # ragged last group, act-order, asym
    (24, 300, 3, 128, False, False, True, "int4"),  # 3-bit, real fp16 zeros, ragged
    (19, 53, 2, -1, False, True, True, "int4"),  # per channel, odd width, permuted
    (33, 72, 4, 16, False, True, True, "int4"),  # groups of 16 padded to 32, ragged
    (16, 256, 4, 256, True, True, False, "int4"),
    (20, 200, 4, 96, False, True, True, "int4"),  # 3 op groups of 32 per group, ragged
    (21, 96, 3, 48, True, True, True, "dense"),  # 48: no op group divides it
    (37, 53, 8, -1, False, True, True, "int8"),  # asymmetric: offset term, odd width
    (20, 70, 6, -1, True, True, False, "int8"),
    (17, 96, 8, 32, True, True, True, "dense"),  # 8-bit groups
]


@pytest.mark.parametrize("rows,cols,bits,group,sym,round_zero,perm,path", INT_CASES)
def test_int_fast_paths_match_reference(rows, cols, bits, group, sym, round_zero, perm, path):
    layer = _int_layer(rows, cols, bits, group, sym, round_zero, perm)
    _check(layer, path)


def test_block_scaled_weight_takes_dense_bf16():
    w = torch.randn(24, 64) * 0.1
    layer = QuantLinear(PackedBlockWeight.quantize(w, preset("mxfp4")), None)
    _check(layer, "dense")


@pytest.mark.parametrize(
    "rows,cols,kw,path",
    [
        (37, 100, {"ragged_groups": True}, "spqr-int4"),  # 3-bit, beta1 16, act-order
        (19, 64, {"bits": 4, "group_size": 32, "act_order": False}, "spqr-int4"),
        (33, 48, {"group_size": -1, "outlier_threshold": float("inf")}, "spqr-int4"),
        (20, 48, {"bits": 5}, "dense"),
    ],
)
def test_spqr_bf16_paths_match_reference(rows, cols, kw, path):
    layer = _spqr_layer(rows, cols, **kw)
    if "outlier_threshold" not in kw:
        assert layer.stored_weight().outlier_count > 0  # the sparse add is exercised
    _check(layer, path, lead=(1,))


def test_fp32_activations_keep_the_exact_paths():
    layer = _int_layer(37, 100, 4, 64, False, True, True)
    x = torch.randn(2, 100)
    expected = x @ layer.stored_weight().dequantize().T + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert layer.fast is None and dispatch.path_name(layer) == "reference"
    spqr = _spqr_layer(20, 48)
    spqr(torch.randn(1, 48))
    assert dispatch.path_name(spqr) == "spqr-tiled"  # the tiled fp32 path, no fp32 copy
    assert spqr._dequantized is None
    spqr(torch.randn(1, 48, dtype=torch.float64))
    assert dispatch.path_name(spqr) == "reference"  # fp64: nothing prepared


def test_kernel_follows_input_dtype_and_is_not_saved():
    layer = _int_layer(40, 96, 4, 32)
    before = set(layer.state_dict())
    layer(torch.randn(1, 96).bfloat16())
    assert dispatch.path_name(layer) == "int4" and set(layer.state_dict()) == before
    layer(torch.randn(1, 96))  # back to fp32: re-planned, exact path
    assert dispatch.path_name(layer) == "reference"


RUN_TIME_STATE = {"kernel", "fast_key", "_dequantized", "calibration_weight"}


def _full_layer():
    """A SpQR layer with every add-on that has run-time interplay: act quant and low-rank."""
    layer = _spqr_layer(37, 100, ragged_groups=True)
    g = torch.Generator().manual_seed(1)
    layer.act_quant = ActQuantizer("int8")
    layer.lowrank = LowRank(torch.randn(37, 4, generator=g) * 0.1,
                            torch.randn(4, 100, generator=g) * 0.1)
    return layer


def test_kernel_state_is_declared_fields_only():
    """Preparing, calling in every dtype, toggling the mode and keeping a calibration weight
    add no attribute to a QuantLinear: all run-time state is declared in ``__init__``."""
    layer = _full_layer()
    before, children = set(vars(layer)), set(layer._modules)
    assert RUN_TIME_STATE <= before and "fast" in children and layer.fast is None
    assert layer.fast_key is None and layer.calibration_weight is None
    for dtype in (torch.bfloat16, torch.float32, torch.float16, torch.float64):
        dispatch.prepare(layer, dtype)
        layer(torch.randn(2, 100).to(dtype))
        layer.set_kernel_mode("reference")
        layer(torch.randn(2, 100).to(dtype))
        layer.set_kernel_mode("auto")
    layer.keep_calibration_weight(torch.randn(37, 100))
    spqr_cpu.spqr_linear(layer, torch.randn(2, 100))
    assert set(vars(layer)) == before and set(layer._modules) == children
    with pytest.raises(ValueError, match="kernel mode"):
        layer.set_kernel_mode("fast")
    assert not hasattr(dispatch, "register_fast_path")  # one mechanism: planners


def test_spqr_fp32_cpu_path_is_a_planned_kernel():
    layer = _spqr_layer(150, 200, bits=5)
    request = dispatch.request_for(layer, torch.float32, "cpu")
    kernel = dispatch.plan(request)
    assert isinstance(kernel, spqr_cpu.SpQRTiledLinear) and kernel.path == "spqr-tiled"
    assert kernel.qweight.data_ptr() == layer.qweight.data_ptr()  # the layer's codes, shared
    assert set(kernel.state_dict()) == set()
    x = torch.randn(3, 5, 200)
    ref = torch.nn.functional.linear(x, layer.stored_weight().dequantize(), layer.bias)
    assert dispatch.prepare(layer, torch.float32) == "spqr-tiled"
    y = layer(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(y, kernel(x)) and torch.equal(y, spqr_cpu.spqr_linear(layer, x))
    for dtype, path in [(torch.bfloat16, "dense"), (torch.float16, "dense"),
                        (torch.float64, None)]:  # 5 bits: no int4 op; the tiled path is fp32
        kernel = dispatch.plan(dispatch.request_for(layer, dtype, "cpu"))
        assert (kernel and kernel.path) == path
    cuda = dispatch.plan(dispatch.request_for(layer, torch.float32, "cuda"))
    assert (cuda and cuda.path) == ("triton-spqr" if triton_kernels.available() else None)


def test_act_quant_runs_before_the_kernel_unless_it_quantizes_itself():
    layer = _int_layer(40, 96, 4, 32)
    layer.act_quant = ActQuantizer("int8")
    x = torch.randn(3, 96).bfloat16()
    assert dispatch.prepare(layer, torch.bfloat16) == "int4"
    assert torch.equal(layer(x), layer.fast(layer.act_quant(x)))

    class Own(dispatch.Kernel):  # stands in for the FP8 GPU kernel (it takes CUDA inputs only)
        path = "own"
        quantizes_input = True
        frees_reference_cache = False

        def accepts(self, x):
            return True

        def forward(self, x):
            return x[..., :40] * 2

    key = layer.fast_key
    layer.dequantized_weight()
    layer.attach_kernel(Own(), key)
    assert layer._dequantized is not None  # this kernel leaves the reference cache
    assert torch.equal(layer(x), x[..., :40] * 2)  # the raw input, quantized by the kernel
    assert dispatch.path_name(layer) == "own"
    layer.attach_kernel(None, key)
    assert dispatch.path_name(layer) == "reference"
    expected = reference.linear(layer.act_quant(x), layer.dequantized_weight(), layer.bias)
    assert torch.equal(layer(x), expected)


def _fp8_act_layer(constraint: str) -> QuantLinear:
    from lowbit.algorithms.zqfp import SCALE_CONSTRAINTS
    from lowbit.formats.blockscale import BlockScaledConfig

    rule, fmt = SCALE_CONSTRAINTS[constraint]
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * 0.1
    stored = PackedBlockWeight.quantize(w, BlockScaledConfig("fp4_e2m1", 32, fmt, rule))
    return QuantLinear(stored, torch.randn(32), ActQuantizer("fp8_e4m3"))


def test_fp8_planner_takes_exact_fp8_weights_on_capable_gpus_only(monkeypatch):
    """The FP8 GPU path is a CUDA planner: never for CPU requests; on a (pretended) capable GPU
    it prepares an FP8 kernel for M2 weights, which holds nothing saved and quantizes the input
    itself (its math: ``torch._scaled_mm``, which also runs on CPU)."""
    layer = _fp8_act_layer("m2")
    assert fp8_gpu.plan_fp8(dispatch.request_for(layer, torch.bfloat16, "cpu")) is None
    assert dispatch.prepare(layer, torch.bfloat16) == "dense"  # CPU: simulated, act quant first
    monkeypatch.setattr(fp8_gpu, "availability", lambda: (True, "pretend"))
    monkeypatch.setattr(fp8_gpu.FP8Weight, "to", lambda self, device: self)  # stays on CPU
    kernel = fp8_gpu.plan_fp8(dispatch.request_for(layer, torch.bfloat16, "cuda"))
    assert isinstance(kernel, fp8_gpu.FP8Linear) and kernel.path == "fp8"
    assert kernel.quantizes_input and set(kernel.state_dict()) == set()
    assert kernel.act_quant is layer.act_quant and not list(kernel.children())
    x = torch.randn(3, 64)
    expected = fp8_gpu.fp8_matmul(x, layer.act_quant, kernel.weight, layer.bias)
    assert torch.equal(kernel(x), expected)
    unconstrained = _fp8_act_layer("none")  # fp16 group scales: not exactly FP8
    assert fp8_gpu.plan_fp8(dispatch.request_for(unconstrained, torch.bfloat16, "cuda")) is None


def test_state_dict_keys_do_not_change_with_kernels(tmp_path):
    """Prepared kernels and the calibration weight are never saved: the keys of a layer that
    ran every path equal a fresh one's, and it reloads into a fresh layer strictly."""
    layer = _full_layer()
    keys = list(layer.state_dict())
    for dtype in (torch.bfloat16, torch.float32):
        layer(torch.randn(2, 100).to(dtype))
        assert list(layer.state_dict()) == keys
    layer.keep_calibration_weight(torch.randn(37, 100))
    assert list(layer.state_dict()) == keys
    torch.save(layer.state_dict(), tmp_path / "layer.pt")
    fresh = _full_layer()
    fresh.load_state_dict(torch.load(tmp_path / "layer.pt"), strict=True)
    assert list(fresh.state_dict()) == keys
    x = torch.randn(2, 100)
    assert torch.equal(fresh(x), layer(x))


def test_layouts():
    assert layout_for(576, 576).op_group == 64 and layout_for(576, 576).op_cols == 576
    assert layout_for(1536, 128).op_cols == 1536
    assert layout_for(576, 128).op_group == 64  # 576 columns: no padding beats fewer scales
    padded = layout_for(40, 16)
    assert padded.padded and padded.op_cols == 96
    assert padded.op_column().tolist()[14:18] == [14, 15, 32, 33]
    assert layout_for(96, 48) is None


@pytest.mark.slow
def test_spqr_kernel_compiles():
    """The int4 op, the input gather and the sparse CSR outlier matmul under torch.compile."""
    layer = _spqr_layer(37, 100, ragged_groups=True)
    dispatch.prepare(layer, torch.bfloat16)
    x = torch.randn(1, 100).bfloat16()
    compiled = torch.compile(layer.fast)
    torch.testing.assert_close(compiled(x).float(), layer.fast(x).float(), rtol=1e-2, atol=1e-2)
