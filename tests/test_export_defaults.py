"""Default ``lowbit quantize`` outputs export to compressed-tensors (issue 21): RTN, GPTQ
(act-order with static groups), ZeroQuant-FP W4A8, and W8A8 INT8 (SmoothQuant per token,
ZeroQuant-FP per tensor); each export loads in transformers and computes lowbit's logits.

INT8 activations are checked under vLLM's semantics (``x_q = clamp(round(x / s), -128, 127)``,
``s = amax / 127`` per token, or the stored ``input_scale``), emulated here on the model that
compressed-tensors' own decompression builds (transformers' fake-quant forward computes a
dynamic int8 scale as ``amax / 127.5``, which is not what the engines run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from export_util import IDS, hf_model, logits, rel_err
from safetensors.torch import load_file

from lowbit import api
from lowbit.cli.main import main
from lowbit.export.compressed_tensors import NotExpressible, export_compressed_tensors
from lowbit.export.gptq_layout import export_gptq
from lowbit.export.lowbit_format import load_quantized

ct = pytest.importorskip("compressed_tensors")

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = api.CalibSpec(nsamples=4, seqlen=64, batch_size=4)


def _quantize(model: Path, out: Path, method: str, settings: dict) -> Path:
    loaded = api.load_model(str(model))
    result = api.quantize(loaded, api.build_config(method, settings), CALIB, progress=False)
    return api.save_quantized(loaded, result, out)


def _config(out: Path) -> dict:
    """The export's quantization_config, after compressed-tensors' own model accepts it."""
    from compressed_tensors.quantization import QuantizationConfig

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qc)
    return qc


def _vllm_int8_inputs(model: torch.nn.Module, out: Path) -> list:
    """Forward pre-hooks rounding the input of every linear the export's single config group
    targets to INT8 as vLLM does: per token ``s = amax / 127``, or the stored ``input_scale``."""
    qc = _config(out)
    (group,) = qc["config_groups"].values()
    act = group["input_activations"]
    assert group["targets"] == ["Linear"] and act["type"] == "int" and act["symmetric"]
    stored = load_file(str(out / "model.safetensors"))

    def hook(name: str):
        def quantize(_module, args):
            x = args[0].float()
            if act["dynamic"]:
                s = x.abs().amax(dim=-1, keepdim=True) / 127
            else:
                s = stored[f"{name}.input_scale"].float()
            return (torch.clamp(torch.round(x / s), -128, 127) * s).to(args[0].dtype)

        return quantize

    return [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n not in qc["ignore"]]


def _group(qc: dict) -> dict:
    (group,) = qc["config_groups"].values()
    return group


@pytest.mark.parametrize("fixture", [
    "gemma3_tiny",  # every Gemma-3 linear and norm kind, widths 256-1024
    pytest.param("gemma3_2blocks", marks=pytest.mark.slow),  # 30-45 s each: 262k-word head
])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_default_weight_only_exports_load_with_same_logits(method, fixture, request, tmp_path):
    """`lowbit quantize MODEL --method {rtn,gptq}` with every setting at its default (W4 g128
    sym; GPTQ act-order with static groups: no permutation stored)."""
    src = _quantize(request.getfixturevalue(fixture), tmp_path / "q", method, {})
    out = export_compressed_tensors(src, tmp_path / "ct")
    weights = _group(_config(out))["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 128, True)
    lowbit_model = load_quantized(src)[0]
    ids = IDS % lowbit_model.config.vocab_size  # the tiny model has 512 words
    err = rel_err(logits(lowbit_model, ids), logits(hf_model(out, dequantize=False), ids))
    print(f"default {method} -> compressed-tensors: max relative logit error {err:.3g}")
    assert err <= 1e-6


def test_default_gptq_by_the_cli_exports(smollm2_2blocks, tmp_path):
    """The issue's command line (calibration cut short): act-order is on, no permutation is
    stored, the recipe records static_groups, and `lowbit export` writes compressed-tensors."""
    q, ct_dir = tmp_path / "q", tmp_path / "ct"
    argv = ["quantize", str(smollm2_2blocks), "--method", "gptq", "--bits", "4", "-g", "64",
            "--nsamples", "4", "--seqlen", "64", "--out", str(q)]
    assert main(argv) == 0
    recipe = json.loads((q / "lowbit.json").read_text())["recipe"][0]
    assert recipe["act_order"] is True and recipe["static_groups"] is True
    assert main(["export", str(q), "--format", "compressed-tensors", "--out", str(ct_dir)]) == 0
    assert _group(_config(ct_dir))["weights"]["actorder"] is None
    err = rel_err(logits(load_quantized(q)[0]), logits(hf_model(ct_dir, dequantize=False)))
    assert err <= 1e-6


def test_gptq_without_static_groups_exports_to_gptq_only(tiny_model, tmp_path):
    """--no-static-groups stores the act-order permutation: refused by compressed-tensors with
    its one-line error, written by the GPTQ layout as desc_act."""
    src = _quantize(tiny_model, tmp_path / "q", "gptq",
                    {"bits": 4, "group_size": 32, "static_groups": False})
    with pytest.raises(NotExpressible, match="act-order column permutation") as info:
        export_compressed_tensors(src, tmp_path / "ct")
    assert "\n" not in str(info.value) and "without --no-static-groups" in str(info.value)
    assert not (tmp_path / "ct").exists() or not any((tmp_path / "ct").iterdir())
    out = export_gptq(src, tmp_path / "gptq")
    qc = json.loads((out / "quantize_config.json").read_text())
    assert (qc["desc_act"], qc["static_groups"]) == (True, False)


@pytest.mark.slow  # 35 s on gemma3 (W4A8-INT8 and W8A8 exports stay in the default suite)
def test_zqfp_w4a8_exports_with_fp8_activations(gemma3_2blocks, tmp_path):
    """ZeroQuant-FP W4A8 on integer weights (its defaults otherwise: FP8 E4M3 activations per
    token, static groups, g128): pack-quantized + dynamic FP8 input_activations, loaded by
    transformers' default path, which quantizes the activations itself."""
    src = _quantize(gemma3_2blocks, tmp_path / "q", "zqfp", {"weight_format": "int4"})
    out = export_compressed_tensors(src, tmp_path / "ct")
    group = _group(_config(out))
    assert group["format"] == "pack-quantized"
    assert (group["input_activations"]["type"], group["input_activations"]["strategy"]) == (
        "float", "token")
    err = rel_err(logits(load_quantized(src)[0]), logits(hf_model(out, dequantize=False)))
    print(f"zqfp int4 + fp8 token -> compressed-tensors: max relative logit error {err:.3g}")
    assert err <= 1e-6


def _fp32_decompressed_int4(model: torch.nn.Module, out: Path, group: dict) -> None:
    """Replace the weights transformers' ``dequantize=True`` built (``scale * q`` in the fp16
    scale's dtype, rounded) by compressed-tensors' own unpacking and dequantization with the
    scales in fp32, as an int kernel's fp32 epilogue applies them."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    args = QuantizationArgs(**group["weights"])
    stored = load_file(str(out / "model.safetensors"))
    for name, module in model.named_modules():
        if f"{name}.weight_packed" in stored:
            shape = torch.Size(stored[f"{name}.weight_shape"].tolist())
            q = unpack_from_int32(stored[f"{name}.weight_packed"], args.num_bits, shape)
            w = dequantize(q, stored[f"{name}.weight_scale"].float(), args=args)
            module.weight.data.copy_(w)


def test_zqfp_w4a8_int8_exports(smollm2_2blocks, tmp_path):
    """ZeroQuant-FP INT4 weights (g64) with INT8 activations per token: pack-quantized + int8
    dynamic input_activations, decoded by compressed-tensors with fp32 scales."""
    settings = {"weight_format": "int4", "group_size": 64, "act_format": "int8"}
    src = _quantize(smollm2_2blocks, tmp_path / "q", "zqfp", settings)
    out = export_compressed_tensors(src, tmp_path / "ct")
    group = _group(_config(out))
    assert group["format"] == "pack-quantized" and group["input_activations"]["type"] == "int"
    hf = hf_model(out, dequantize=True)
    _fp32_decompressed_int4(hf, out, group)
    _vllm_int8_inputs(hf, out)
    err = rel_err(logits(load_quantized(src)[0]), logits(hf))
    print(f"zqfp int4 g64 + int8 token -> compressed-tensors: max relative logit error {err:.3g}")
    assert err <= 1e-6


def test_zqfp_default_fp4_weights_are_refused_naming_the_exportable_settings(
    tiny_model, tmp_path
):
    """ZeroQuant-FP's own default (FP4 E2M1 weights with fp16 group scales) has no
    compressed-tensors form; the error says which zqfp settings export."""
    src = _quantize(tiny_model, tmp_path / "q", "zqfp", {"group_size": 32})
    with pytest.raises(NotExpressible, match="fp4_e2m1") as info:
        export_compressed_tensors(src, tmp_path / "ct")
    message = str(info.value)
    assert "\n" not in message and "--weight-format int4" in message


def test_smoothquant_w8a8_int8_per_token_exports_exactly(smollm2_2blocks, tmp_path):
    """`smoothquant --bits 8 --abits 8 --sym --act-symmetric`: int-quantized int8 per-channel
    weights, int8 per-token dynamic activations; the smoothing is folded into the norms (and
    up_proj's rows), so the export computes lowbit's logits under vLLM's int8 semantics."""
    settings = {"bits": 8, "abits": 8, "symmetric": True, "act_symmetric": True}
    src = _quantize(smollm2_2blocks, tmp_path / "q", "smoothquant", settings)
    out = export_compressed_tensors(src, tmp_path / "ct")
    qc = _config(out)
    group = _group(qc)
    assert (qc["format"], group["format"]) == ("int-quantized", "int-quantized")
    assert group["weights"] == {**group["weights"], "num_bits": 8, "type": "int",
                                "symmetric": True, "strategy": "channel"}
    assert group["input_activations"] == {**group["input_activations"], "num_bits": 8,
                                          "type": "int", "symmetric": True,
                                          "strategy": "token", "dynamic": True}
    stored = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    assert stored[f"{name}.weight"].dtype == torch.int8
    assert stored[f"{name}.weight_scale"].shape == (576, 1)
    base = load_file(str(smollm2_2blocks / "model.safetensors"))
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(stored[norm], base[norm])  # smoothing folded into the norm

    lowbit_logits = logits(load_quantized(src)[0])
    hf = hf_model(out, dequantize=True)
    plain = logits(hf)
    hooks = _vllm_int8_inputs(hf, out)
    err = rel_err(lowbit_logits, logits(hf))
    for h in hooks:
        h.remove()
    print(f"smoothquant W8A8 int8 per token -> compressed-tensors: max rel. logit error {err:.3g}")
    assert err <= 1e-6
    assert rel_err(lowbit_logits, plain) > 1e-4  # the activations really are quantized


def test_zqfp_w8a8_int8_static_exports_exactly(smollm2_2blocks, tmp_path):
    """ZeroQuant-FP INT8 weights per channel with static per-tensor INT8 activations: an
    ``input_scale`` per linear, used as stored by compressed-tensors' own forward (transformers'
    default path) and by vLLM (emulated): lowbit's logits both ways. Linears that vLLM fuses
    (q/k/v, gate/up) read the same input, so their scales agree (vLLM keeps one)."""
    settings = {"weight_format": "int8", "group_size": -1, "act_format": "int8",
                "act_granularity": "tensor"}
    src = _quantize(smollm2_2blocks, tmp_path / "q", "zqfp", settings)
    out = export_compressed_tensors(src, tmp_path / "ct")
    act = _group(_config(out))["input_activations"]
    assert (act["type"], act["strategy"], act["dynamic"]) == ("int", "tensor", False)
    stored = load_file(str(out / "model.safetensors"))
    for layer in range(2):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        scales = [stored[f"{attn}.{p}_proj.input_scale"] for p in "qkv"]
        assert all(torch.equal(s, scales[0]) for s in scales)
        assert torch.equal(stored[f"{mlp}.gate_proj.input_scale"],
                           stored[f"{mlp}.up_proj.input_scale"])

    lowbit_logits = logits(load_quantized(src)[0])
    err_ct = rel_err(lowbit_logits, logits(hf_model(out, dequantize=False)))
    hf = hf_model(out, dequantize=True)
    _vllm_int8_inputs(hf, out)
    err_vllm = rel_err(lowbit_logits, logits(hf))
    print(f"zqfp W8A8 int8 static -> compressed-tensors: {err_ct:.3g} (its forward), "
          f"{err_vllm:.3g} (vLLM int8 emulated)")
    assert err_ct <= 1e-6 and err_vllm <= 1e-6


def test_smoothquant_defaults_are_refused_naming_the_fix(tiny_model, tmp_path):
    """SmoothQuant's defaults are QLLM's baseline quantizers (asymmetric weights and
    activations): no int8 engine runs them, and the error names the flags that do."""
    src = _quantize(tiny_model, tmp_path / "q", "smoothquant", {"bits": 8, "abits": 8})
    with pytest.raises(NotExpressible, match="--act-symmetric") as info:
        export_compressed_tensors(src, tmp_path / "ct")
    assert "\n" not in str(info.value)
    sym_acts = _quantize(tiny_model, tmp_path / "q2", "smoothquant",
                         {"bits": 8, "abits": 8, "act_symmetric": True})
    with pytest.raises(NotExpressible, match="--sym"):
        export_compressed_tensors(sym_acts, tmp_path / "ct2")
