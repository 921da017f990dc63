"""CPU fast paths (int4pack, int8pack, dense bf16, SpQR int4 + sparse) against the reference
dequantize-then-matmul, on awkward shapes: odd widths, row counts not multiples of 16, ragged
groups, act-order permutations, asymmetric (integer and real) zero points.

Tolerance: the fast paths multiply bf16 activations by weights whose statistics are rounded to
bf16, with bf16 outputs, so they are held against the exact fp32 product of the same bf16 input
(``x.float() @ W^T``) at a relative Frobenius error of ``TOL = 5e-3`` (bf16's unit roundoff is
``2**-9 = 2e-3``; the dense bf16 reference itself sits near 2e-3 here). A wrong column order,
group map or zero point gives errors of order 1.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.algorithms.spqr import SpQRConfig, spqr_solve
from lowbit.formats.blockscale import preset
from lowbit.formats.intq import IntGrid, rtn_quantize
from lowbit.formats.packed_block import PackedBlockWeight
from lowbit.formats.packed_int import PackedIntWeight
from lowbit.kernels import dispatch
from lowbit.kernels.int4_cpu import layout_for
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
    layer.kernel = "reference"
    assert _rel_err(layer(x), oracle) < TOL  # the oracle path is still there
    layer.kernel = "auto"
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
    assert dispatch.path_name(spqr).startswith("spqr_linear/")  # the tiled fp32 path first


def test_kernel_follows_input_dtype_and_is_not_saved():
    layer = _int_layer(40, 96, 4, 32)
    before = set(layer.state_dict())
    layer(torch.randn(1, 96).bfloat16())
    assert dispatch.path_name(layer) == "int4" and set(layer.state_dict()) == before
    layer(torch.randn(1, 96))  # back to fp32: re-planned, exact path
    assert dispatch.path_name(layer) == "reference"


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
