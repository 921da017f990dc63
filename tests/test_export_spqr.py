"""SpQR export in the layout of the transformers SpQR integration (``spqr_quant`` 0.2.0), read
back by a decoder written here from that published layout (not lowbit's code): in fp32 the
decoded weights equal lowbit's bit for bit; with the CUDA kernel's fp16 arithmetic they differ
by fp16 rounding only. The CUDA kernel itself needs a GPU and is not run here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from export_util import build_dir, int_weight, logits, plain_model, rel_err
from safetensors.torch import load_file

from lowbit import api
from lowbit.algorithms.spqr import SpQRConfig, spqr_solve
from lowbit.errors import LowbitError
from lowbit.export.lowbit_format import load_quantized, quantized_layers
from lowbit.export.spqr_layout import export_spqr, layer_tensors
from lowbit.nn.quant_linear import QuantLinear

TILE = 16


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- reference decoder, from the published layout -------------------------------------------


def _fp16(bits: torch.Tensor) -> torch.Tensor:
    """fp16 tensor from int64 bit patterns in [0, 2^16)."""
    return torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16).view(
        torch.float16)


def _unpack_tiles(tensors: dict, name: str, rows: int, cols: int) -> dict[str, torch.Tensor]:
    """Split ``dense_weights`` (one int64 word per tile row; tile (h, t), row k at index
    ``(h * n + t) * 16 + k``): word bits 0-2 scale code, 3-5 zero code, 6 + 3 l weight code l,
    54-61 byte (k // 2) of the tile's second-level word (fp16 s_s | z_s | s_z | z_z)."""
    n = cols // TILE
    dense = tensors[f"{name}.dense_weights"]
    assert dense.dtype == torch.int64 and dense.numel() == rows * n
    assert bool((dense >= 0).all()), "bits 62-63 must be zero"
    words = dense.view(rows // TILE, n, TILE).transpose(1, 2).reshape(rows, n)  # [R, n]
    shifts = 6 + 3 * torch.arange(TILE)
    byte = (words >> 54) & 0xFF
    k = torch.arange(rows) % TILE
    second = (byte << (8 * (k // 2)).view(-1, 1)).view(rows // TILE, TILE, n)
    word2 = second[:, 0]
    for i in range(1, TILE):
        word2 = word2 | second[:, i]  # [R/16, n]
    halves = [_fp16((word2 >> (16 * i)) & 0xFFFF).repeat_interleave(TILE, 0) for i in range(4)]
    return {"qs": words & 7, "qz": (words >> 3) & 7,
            "q": ((words[..., None] >> shifts) & 7).view(rows, cols),
            "s_s": halves[0], "z_s": halves[1], "s_z": halves[2], "z_z": halves[3]}


def reference_decode(tensors: dict, name: str, rows: int, cols: int,
                     kernel_fp16: bool = False) -> torch.Tensor:
    """fp32 ``[R, C]`` weight in input column order.

    ``kernel_fp16=False``: the formula in fp32. ``True``: as spqr_quant's CUDA kernel computes
    it (``__hsub``/``__hmul`` in fp16 for the statistics and the dense weights; the fp16
    outlier values are added in the fp32 accumulator)."""
    p = _unpack_tiles(tensors, name, rows, cols)
    dt = torch.float16 if kernel_fp16 else torch.float32
    s = p["s_s"].to(dt) * (p["qs"].to(dt) - p["s_z"].to(dt))  # [R, n]
    z = p["z_s"].to(dt) * (p["qz"].to(dt) - p["z_z"].to(dt))
    s, z = s.repeat_interleave(TILE, 1), z.repeat_interleave(TILE, 1)
    w = (s * (p["q"].to(dt) - z)).float()  # stored column order
    offsets = tensors[f"{name}.row_offsets"].long()
    assert offsets.numel() == rows + 1  # CSR, not PTCSR
    cv = tensors[f"{name}.col_vals"].long() & 0xFFFFFFFF
    r = torch.repeat_interleave(torch.arange(rows), offsets[1:] - offsets[:-1])
    w.index_put_((r, cv & 0xFFFF), _fp16(cv >> 16).float(), accumulate=True)
    pairs = tensors[f"{name}.in_perm"].long() & 0xFFFFFFFF
    perm = torch.stack([pairs & 0xFFFF, pairs >> 16], 1).reshape(-1)  # stored j reads x[perm[j]]
    out = torch.empty_like(w)
    out[:, perm] = w
    return out


# ---- real model, end to end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def spqr_dir(smollm2_2blocks, tmp_path_factory):
    """smollm2 cut to 2 blocks; 3-bit SpQR 16x16 (defaults: act-order, outliers) on block 0's
    attention and up_proj, the other linears left in float (keeps the test fast)."""
    loaded = api.load_model(str(smollm2_2blocks))
    config = {"ignore": ["model.layers.1.*", "*.mlp.gate_proj", "*.mlp.down_proj"]}
    calib = api.CalibSpec(nsamples=4, seqlen=64, batch_size=4)
    result = api.quantize(loaded, api.build_config("spqr", config), calib, progress=False)
    return api.save_quantized(loaded, result, tmp_path_factory.mktemp("spqr") / "q")


@pytest.fixture(scope="module")
def exported(spqr_dir, tmp_path_factory):
    return export_spqr(spqr_dir, tmp_path_factory.mktemp("spqr-export") / "out")


def _decoded_model(out: Path, tensors: dict, names: list[str], layers: dict, kernel_fp16: bool):

    suffixes = tuple(f".{t}" for t in ("dense_weights", "row_offsets", "col_vals", "in_perm"))
    state = {k: v for k, v in tensors.items() if not k.endswith(suffixes)}
    for name in names:
        q = layers[name]
        state[f"{name}.weight"] = reference_decode(tensors, name, q.out_features,
                                                   q.in_features, kernel_fp16)
    return plain_model(out, state)


def test_export_decodes_to_lowbit_weights_and_logits(spqr_dir, exported):
    tensors = load_file(str(exported / "model.safetensors"))
    lowbit_model = load_quantized(spqr_dir)[0]
    layers = quantized_layers(lowbit_model)
    assert len(layers) == 5
    worst = 0.0
    for name, q in layers.items():
        w = q.dequantized_weight()
        assert q.stored_weight().perm is not None and q.stored_weight().outlier_count > 0
        assert torch.equal(reference_decode(tensors, name, *w.shape), w), name
        w16 = reference_decode(tensors, name, *w.shape, kernel_fp16=True)
        worst = max(worst, rel_err(w, w16))
    ref = logits(lowbit_model)  # lowbit's CPU SpQR fast path (its own summation order)
    decoded = logits(_decoded_model(exported, tensors, list(layers), layers, False))
    fast = rel_err(ref, decoded)
    for q in layers.values():
        q.kernel = "reference"  # dequantize + F.linear, as nn.Linear computes
    exact = rel_err(logits(lowbit_model), decoded)
    fp16 = rel_err(ref, logits(_decoded_model(exported, tensors, list(layers), layers, True)))
    print(f"\nspqr export, fp32 decode: logit error {exact:.3g} vs lowbit's reference kernel, "
          f"{fast:.3g} vs its fast path; kernel fp16 arithmetic: max weight error {worst:.3g} "
          f"(max |dw| / max |w| per layer), logit error {fp16:.3g}")
    assert exact == 0.0 and fast < 1e-6
    assert 0 < worst < 2e-3  # fp16 rounding of statistics and weights, nothing more
    assert fp16 < 1e-2


def test_config_is_what_transformers_spqr_reads(spqr_dir, exported):
    from transformers import AutoConfig, AutoModelForCausalLM, SpQRConfig
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = json.loads((exported / "config.json").read_text())
    assert (config["dtype"], config["torch_dtype"]) == ("float16", "float16")
    assert config["lowbit_export"]["format"] == "spqr"
    qc = config["quantization_config"]
    parsed = SpQRConfig.from_dict(qc)  # bits 3, beta1 = beta2 = 16 or a ValueError
    assert (parsed.quant_method, parsed.bits, parsed.beta1, parsed.beta2) == ("spqr", 3, 16, 16)
    tensors = load_file(str(exported / "model.safetensors"))
    quantized = set(quantized_layers(load_quantized(spqr_dir)[0]))
    hf_config = AutoConfig.from_pretrained(exported)
    del hf_config.quantization_config
    skip = qc["modules_to_not_convert"]
    linears = [n for n, m in AutoModelForCausalLM.from_config(hf_config).named_modules()
               if isinstance(m, torch.nn.Linear)]
    for name in linears:  # transformers 5 (regex on module names) and 4 (weight paths) agree
        converted = should_convert_module(name, skip)
        assert converted == (f"{name}.weight" not in skip) == (name in quantized), name
        if not converted:
            assert f"{name}.dense_weights" not in tensors
            continue
        for key, dtype in (("dense_weights", torch.int64), ("row_offsets", torch.int32),
                           ("col_vals", torch.int32), ("in_perm", torch.int32)):
            t = tensors[f"{name}.{key}"]
            assert t.dtype == dtype and list(t.shape) == [qc["shapes"][f"{name}.{key}.shape"]]
    assert "lm_head" in skip and len(qc["shapes"]) == 4 * len(quantized)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_transformers_dispatches_to_its_spqr_quantizer(exported):
    """The integration needs CUDA (and spqr_quant's CUDA kernel): on CPU transformers gets as
    far as the SpQR quantizer's environment check."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(RuntimeError, match="GPU is required to run SpQR"):
        AutoModelForCausalLM.from_pretrained(exported)


# ---- synthetic layers: no permutation, refusals ---------------------------------------------


def _layer(rows=32, cols=64, bias=False, **kw) -> QuantLinear:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[torch.rand(rows, cols, generator=g) < 0.02] *= 20
    x = torch.randn(256, cols, generator=g) * torch.exp(torch.randn(cols, generator=g))
    stored = spqr_solve(SpQRConfig(**kw), w, 2 * x.T @ x / 256).stored
    return QuantLinear(stored, torch.randn(rows) if bias else None)


def test_layer_without_act_order_gets_identity_permutation():
    layer = _layer(act_order=False, outlier_threshold=0.05)
    stored = layer.stored_weight()
    assert stored.perm is None and (stored.outlier_values < 0).any()  # sign bit in col_vals
    own = layer_tensors("m", layer)
    pairs = own["in_perm"].long()
    assert torch.equal(pairs, torch.arange(0, 64, 2) | torch.arange(1, 64, 2) << 16)
    assert bool((own["col_vals"] < 0).any())  # negative outliers: int32 with the sign bit set
    tensors = {f"m.{k}": v for k, v in own.items()}
    assert torch.equal(reference_decode(tensors, "m", 32, 64), stored.dequantize())


def test_layer_without_outliers_has_empty_csr():
    layer = _layer(rows=48, cols=80, outlier_threshold=math.inf)
    own = layer_tensors("m", layer)
    assert own["col_vals"].numel() == 0 and torch.equal(own["row_offsets"], torch.zeros(49,
                                                        dtype=torch.int32))
    tensors = {f"m.{k}": v for k, v in own.items()}
    assert torch.equal(reference_decode(tensors, "m", 48, 80), layer.stored_weight().dequantize())


@pytest.mark.parametrize("kw, reason", [
    ({"bits": 4}, "SpQR bits 4"),
    ({"group_size": 32}, "beta1 32"),
    ({"beta2": 8}, "beta2 8"),
    ({"qq_scale_bits": 4}, "statistic bits 4/3"),
    ({"rows": 40}, "shape [40, 64]"),
    ({"bias": True}, "a bias"),
])
def test_refuses_what_the_layout_cannot_hold(kw, reason):
    with pytest.raises(LowbitError, match="Exportable: SpQR") as info:
        layer_tensors("model.layers.0.mlp.up_proj", _layer(**kw))
    assert reason in str(info.value)


def test_cli_exports_and_refuses(spqr_dir, smollm2_2blocks, tmp_path, capsys):
    from lowbit.cli.main import main

    out = tmp_path / "spqr"
    assert main(["export", str(spqr_dir), "--format", "spqr", "--out", str(out)]) == 0
    assert "spqr: 3-bit, 16x16 tiles" in capsys.readouterr().out
    int4 = build_dir(smollm2_2blocks, tmp_path / "int4", int_weight(4, 64, True))
    bad = tmp_path / "bad"
    assert main(["export", str(int4), "--format", "spqr", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: layer model.layers.0.")
    assert "stored weight kind 'int'" in err and "Exportable: SpQR" in err
    assert not bad.exists()
