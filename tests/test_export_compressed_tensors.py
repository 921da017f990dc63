"""compressed-tensors export: the exported folder loads through transformers +
compressed-tensors and computes the lowbit DIR's logits; what it cannot express is refused."""

from __future__ import annotations

import json

import pytest
import torch
from export_util import (
    block_weight,
    build_dir,
    fp8_channel_weight,
    hf_model,
    int_weight,
    logits,
    rel_err,
)

from lowbit.errors import LowbitError
from lowbit.export.compressed_tensors import (
    NotExpressible,
    export_compressed_tensors,
    layer_scheme,
    pack_int32_rows,
)
from lowbit.export.lowbit_format import load_quantized
from lowbit.nn.act_quant import ActQuantizer
from lowbit.nn.lowrank import LowRank
from lowbit.nn.quant_linear import QuantLinear

ct = pytest.importorskip("compressed_tensors")


pytestmark = pytest.mark.usefixtures("one_thread")


def _fp8_token(name):
    return ActQuantizer("fp8_e4m3", "token")


# Weight-only single-scheme exports that transformers 5.x loads only with dequantize=True
# (its default path shapes asymmetric zero points unpacked, and runs FP4 weights in bf16 inside
# an fp32 model). Tolerance on the max relative logit error: fp16 scale products (int) and bf16
# NVFP4 decompression round each weight once; MX scales are powers of two (exact).
CASES = {
    "int4-g64-asym": (int_weight(4, 64, False), 1e-3),
    "nvfp4": (block_weight("nvfp4"), 5e-3),
    "mxfp4": (block_weight("mxfp4"), 1e-6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_weight_only_export_loads_dequantized_with_same_logits(case, smollm2_2blocks, tmp_path):
    weight, tol = CASES[case]
    src = build_dir(smollm2_2blocks, tmp_path / "q", weight)
    out = export_compressed_tensors(src, tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert list(qc["config_groups"]["group_0"]["targets"]) == ["Linear"]
    assert qc["ignore"] == ["lm_head"]  # "Linear" would match the (tied) head too
    err = rel_err(logits(load_quantized(src)[0]), logits(hf_model(out, dequantize=True)))
    print(f"compressed-tensors {case}: max relative logit error {err:.3g}")
    assert err <= tol


def test_mixed_schemes_with_activations_load_with_same_logits(smollm2_2blocks, tmp_path):
    """INT4 g64 sym, INT8 channel, FP8 W8A8 (dynamic per token and static per tensor) and
    W4A8-FP8 layers in one export, loaded by transformers' default compressed-tensors path
    (which quantizes the activations as the scheme says): the same logits exactly."""
    weights = {"q_proj": int_weight(4, 64, True), "k_proj": int_weight(4, 64, True),
               "v_proj": int_weight(8, -1, True), "o_proj": fp8_channel_weight(),
               "gate_proj": fp8_channel_weight(), "up_proj": fp8_channel_weight(),
               "down_proj": int_weight(4, 64, True)}

    def act(name):
        if name.endswith("o_proj"):
            return ActQuantizer.static("fp8_e4m3", 3.0)
        return _fp8_token(name) if name.endswith(("gate_proj", "up_proj", "down_proj")) else None

    src = build_dir(smollm2_2blocks, tmp_path / "q", weights, act)
    out = export_compressed_tensors(src, tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    formats = sorted(g["format"] for g in qc["config_groups"].values())
    assert formats == ["float-quantized"] * 2 + ["pack-quantized"] * 3
    lowbit_model = load_quantized(src)[0]
    hf_logits = logits(hf_model(out, dequantize=False))
    err = rel_err(logits(lowbit_model), hf_logits)
    print(f"compressed-tensors mixed int4/int8/fp8-w8a8/w4a8: max relative logit error {err:.3g}")
    assert err <= 1e-6
    for module in lowbit_model.modules():  # the activations really are quantized by both
        if isinstance(module, QuantLinear):
            module.act_quant = None
    assert rel_err(logits(lowbit_model), hf_logits) > 1e-3


def test_int_packing_matches_compressed_tensors_unpacker():
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    gen = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        codes = torch.randint(0, 1 << bits, (24, 72), generator=gen)
        packed = pack_int32_rows(codes, bits)
        signed = unpack_from_int32(packed, bits, torch.Size(codes.shape))
        assert torch.equal(signed.long() + (1 << (bits - 1)), codes)
        zp = pack_int32_rows(codes.t(), bits).t()  # zero points: packed along the rows
        signed = unpack_from_int32(zp, bits, torch.Size(codes.shape), packed_dim=0)
        assert torch.equal(signed.long() + (1 << (bits - 1)), codes)


def _layer(weight_fn, act=None, lowrank=None, shape=(32, 64)):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    return QuantLinear(weight_fn(w), None, act, lowrank)


def _spqr_layer():
    from lowbit.algorithms.spqr import SpQRConfig, spqr_solve

    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    solution = spqr_solve(SpQRConfig(bits=3, group_size=16), w, torch.eye(64))
    return QuantLinear(solution.stored)


REFUSED = {
    "spqr": (_spqr_layer, "stored weight kind 'spqr'"),
    "lorc": (lambda: _layer(int_weight(4, 16, True),
                            lowrank=LowRank(torch.zeros(32, 2), torch.zeros(2, 64))), "LoRC"),
    "asym-int8-acts": (lambda: _layer(int_weight(8, -1, True),
                                      ActQuantizer("int8", "token", symmetric=False)),
                       "asymmetric int8 activations"),
    "int8-acts-asym-weights": (lambda: _layer(int_weight(8, -1, False),
                                              ActQuantizer("int8", "token")),
                               "INT8 activations with asymmetric weights"),
    "int8-acts-fp8-weights": (lambda: _layer(fp8_channel_weight(), ActQuantizer("int8", "token")),
                              "INT8 activations with block weights"),
    "e5m2-acts": (lambda: _layer(int_weight(4, 16, True), ActQuantizer("fp8_e5m2", "token")),
                  "fp8_e5m2 activations"),
    "3-bit": (lambda: _layer(int_weight(3, 16, True)), "3-bit"),
    "ragged": (lambda: _layer(int_weight(4, 48, True)), "ragged"),
    "fp4-fp16-scales": (lambda: _layer(lambda w: __import__(
        "lowbit.formats.packed_block", fromlist=["x"]).PackedBlockWeight.quantize(
        w, __import__("lowbit.formats.blockscale", fromlist=["x"]).BlockScaledConfig(
            "fp4_e2m1", 32, "fp16", "amax"))), "fp4_e2m1"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_inexpressible_layers_are_refused_naming_the_exportable(case):
    make, reason = REFUSED[case]
    with pytest.raises(NotExpressible) as info:
        layer_scheme("model.layers.0.mlp.up_proj", make())
    message = str(info.value)
    assert isinstance(info.value, LowbitError) and "\n" not in message
    assert reason in message and "model.layers.0.mlp.up_proj" in message
    assert "Exportable: INT4/INT8" in message and "NVFP4" in message


def test_act_order_permutation_is_refused():
    from lowbit.formats.intq import IntGrid, rtn_quantize
    from lowbit.formats.packed_int import PackedIntWeight

    grid = IntGrid(4, 16, True)
    codes, scales, zeros = rtn_quantize(torch.randn(32, 64), grid)
    stored = PackedIntWeight.from_codes(codes, scales, zeros, grid, torch.randperm(64))
    with pytest.raises(NotExpressible, match="act-order"):
        layer_scheme("x", QuantLinear(stored))
