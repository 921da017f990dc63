"""GPTQ-layout export, read back by a reference unpacker written here from the published
AutoGPTQ format (not lowbit's code): dequantized weights equal lowbit's exactly, logits too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from export_util import build_dir, fp8_channel_weight, int_weight, logits, plain_model, rel_err
from safetensors.torch import load_file

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.export.gptq_layout import export_gptq, layer_tensors
from lowbit.export.lowbit_format import load_quantized, quantized_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def _unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """AutoGPTQ packing: 32/bits codes per int32 word, code k at bits [bits*k, bits*k+bits),
    consecutive along ``dim`` (0 for qweight's input dim, 1 for qzeros' output dim)."""
    pf = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts, mask = torch.arange(pf) * bits, (1 << bits) - 1
    if dim == 0:  # [K/pf, N] -> [K, N]
        return ((w[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, w.shape[1])
    return ((w[:, :, None] >> shifts) & mask).reshape(w.shape[0], -1)


def reference_dequantize(tensors: dict, name: str, bits: int) -> torch.Tensor:
    """fp32 ``[R, C]``: W[j, i] = scales[g, j] * (q[i, j] - (qzeros[g, j] + 1)), g = g_idx[i]
    (checkpoint_format "gptq": stored zeros are z - 1)."""
    q = _unpack_int32(tensors[f"{name}.qweight"], bits, 0)  # [C, R]
    z = _unpack_int32(tensors[f"{name}.qzeros"], bits, 1) + 1  # [n, R]
    g = tensors[f"{name}.g_idx"].long()
    scales = tensors[f"{name}.scales"].float()  # [n, R]
    return (scales[g] * (q.float() - z[g].float())).t()


def _check(src: Path, out: Path) -> float:
    """Exact weights and the max relative logit error of the unpacked model."""

    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["checkpoint_format"] == "gptq" and qc["quant_method"] == "gptq"
    tensors = load_file(str(out / "model.safetensors"))
    lowbit_model = load_quantized(src)[0]
    state = {k: v for k, v in tensors.items() if not k.endswith(("qweight", "qzeros", "scales",
                                                                  "g_idx"))}
    for name, layer in quantized_layers(lowbit_model).items():
        w = reference_dequantize(tensors, name, qc["bits"])
        assert torch.equal(w, layer.dequantized_weight()), name
        state[f"{name}.weight"] = w
    return rel_err(logits(lowbit_model), logits(plain_model(out, state)))


def test_gptq_act_order_export_unpacks_exactly(smollm2_2blocks, tmp_path):
    loaded = api.load_model(str(smollm2_2blocks))
    calib = api.CalibSpec(nsamples=4, seqlen=64, batch_size=4)
    cfg = {"bits": 4, "group_size": 64, "act_order": True, "static_groups": False}
    result = api.quantize(loaded, api.build_config("gptq", cfg), calib, progress=False)
    src = api.save_quantized(loaded, result, tmp_path / "q")
    out = export_gptq(src, tmp_path / "gptq")
    qc = json.loads((out / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == (4, 64, True, True)
    tensors = load_file(str(out / "model.safetensors"))
    g_idx = tensors["model.layers.0.mlp.down_proj.g_idx"]
    assert not torch.equal(g_idx, torch.arange(1536, dtype=torch.int32) // 64)  # permuted
    assert torch.equal(torch.bincount(g_idx.long()), torch.full((24,), 64))
    assert int(tensors["model.layers.0.self_attn.q_proj.qzeros"][0, 0]) == 0x77777777
    err = _check(src, out)
    print(f"gptq int4 g64 act-order: max relative logit error {err:.3g}")
    assert err <= 1e-6


def test_gptq_asymmetric_int8_channel_unpacks_exactly(smollm2_2blocks, tmp_path):
    src = build_dir(smollm2_2blocks, tmp_path / "q", int_weight(8, -1, False))
    out = export_gptq(src, tmp_path / "gptq")
    qc = json.loads((out / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == (8, -1, False, False)
    err = _check(src, out)
    print(f"gptq int8 channel asym: max relative logit error {err:.3g}")
    assert err <= 1e-6


@pytest.mark.parametrize(
    "weight, reason",
    [(fp8_channel_weight(), "stored weight kind 'block'"), (int_weight(3, 16, True), "3-bit")],
)
def test_gptq_refuses_what_it_cannot_express(weight, reason):
    from lowbit.nn.quant_linear import QuantLinear

    layer = QuantLinear(weight(torch.randn(32, 64)))
    with pytest.raises(LowbitError, match="Exportable: weight-only") as info:
        layer_tensors("model.layers.0.mlp.up_proj", layer)
    assert reason in str(info.value)


def test_quantize_config_reads_static_groups_from_the_recipe_old_folders_meaning_false():
    """A recipe records static_groups (True by default since issue 21); a folder saved before
    the key existed meant dynamic groups, and its export must not say otherwise."""
    from lowbit.export.gptq_layout import _quantize_config
    from lowbit.nn.quant_linear import QuantLinear

    layers = {"model.layers.0.mlp.up_proj": QuantLinear(int_weight(4, 16, True)(
        torch.randn(32, 64, generator=torch.Generator().manual_seed(0))))}
    saved_now = {"recipe": [api.build_config("gptq", {}).to_dict()]}
    assert _quantize_config(layers, saved_now)["static_groups"] is True
    old = {"recipe": [{"method": "gptq", "bits": 4, "act_order": True}]}
    assert _quantize_config(layers, old)["static_groups"] is False
