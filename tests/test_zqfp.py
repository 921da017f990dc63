"""ZeroQuant-FP: GPTQ onto FP grids, M1/M2 scales, config, CLI, save/reload on a real model."""

from __future__ import annotations

import json

import pytest
import torch
from export_util import assert_same_logits
from safetensors import safe_open
from test_gptq import _problem as gptq_problem

from lowbit import api
from lowbit.algorithms.gptq import GPTQSolver, gptq_quantize_blocks
from lowbit.algorithms.linearwise import relative_errors
from lowbit.algorithms.zqfp import SCALE_CONSTRAINTS, ZQFPConfig
from lowbit.cli.main import main
from lowbit.data.corpora import load_text
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import perplexity
from lowbit.eval.windows import eval_windows
from lowbit.export.lowbit_format import WEIGHTS
from lowbit.formats.blockscale import BlockScaledConfig, quantize_blocks
from lowbit.formats.element import get_format
from lowbit.nn.quant_linear import QuantLinear

CALIB = api.CalibSpec(nsamples=8, seqlen=128, batch_size=4)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Shared 2-core machines: threaded LAPACK stalls at barriers (measured 30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _problem(rows=64, cols=128, seed=0):
    """test_gptq's correlated-input problem plus one outlier weight column."""
    w, h = gptq_problem(rows, cols, seed=seed)
    w[:, 9] *= 10
    return w, h


def _cfg(elem, group, constraint):
    rule, scale_format = SCALE_CONSTRAINTS[constraint]
    return BlockScaledConfig(elem, group, scale_format, rule)


@pytest.mark.parametrize("constraint", ["none", "m1", "m2"])
@pytest.mark.parametrize("act_order,static", [(False, False), (False, True), (True, True)])
def test_gptq_with_diagonal_hessian_is_rtn(constraint, act_order, static):
    """No cross-column error feedback: every group's scale and code must be RTN's exactly."""
    w, _ = _problem(cols=100)  # ragged last group of 4 columns
    w[3] = 0
    h = torch.diag(torch.linspace(0.5, 2.0, 100))
    cfg = _cfg("fp4_e2m1", 32, constraint)
    q, _ = gptq_quantize_blocks(w, h, cfg, GPTQSolver(0.01, act_order, static, block_size=48))
    r = quantize_blocks(w, cfg)
    assert torch.equal(q.codes, r.codes)
    assert torch.equal(q.scales.scales, r.scales.scales)
    assert torch.equal(q.dequantize(), r.dequantize())


@pytest.mark.parametrize(
    "elem,constraint",
    [
        ("fp4_e2m1", "none"),
        ("fp4_e2m1", "m1"),
        ("fp4_e2m1", "m2"),
        ("fp8_e4m3", "none"),
        ("fp8_e4m3", "m2"),
    ],
)
@pytest.mark.parametrize("act_order,static", [(False, False), (True, True)])
def test_fp_gptq_output_error_below_fp_rtn(elem, constraint, act_order, static):
    w, h = _problem()
    cfg = _cfg(elem, 32, constraint)
    q, _ = gptq_quantize_blocks(w, h, cfg, GPTQSolver(0.01, act_order, static, block_size=32))
    _, err_gptq = relative_errors(w, q.dequantize(), h)
    _, err_rtn = relative_errors(w, quantize_blocks(w, cfg).dequantize(), h)
    assert err_gptq < 0.5 * err_rtn  # measured at most 0.302 (fp4 m2, act-order)


def test_block_gptq_refuses_act_order_with_dynamic_groups():
    w, h = _problem()
    with pytest.raises(LowbitError, match="permutation"):
        solver = GPTQSolver(act_order=True, static_groups=False)
        gptq_quantize_blocks(w, h, _cfg("fp4_e2m1", 32, "m1"), solver)


def test_m1_m2_effective_scales_are_powers_of_two():
    w, h = _problem()
    for constraint in ("m1", "m2"):
        cfg = _cfg("fp4_e2m1", 32, constraint)
        q, _ = gptq_quantize_blocks(w, h, cfg, GPTQSolver(act_order=False, static_groups=True))
        base = 1.0 if constraint == "m1" else q.scales.row_scales.float()[:, None]
        mant, _ = torch.frexp(q.scales.effective() / base)
        assert torch.all(mant == 0.5), constraint


def test_config_derives_bits_and_checks_choices():
    c = ZQFPConfig(group_size=64)
    assert (c.bits, c.abits) == (0, 0)  # as given: "from the format", never rewritten
    assert (c.weight_spec.bits, c.act_spec.bits, c.static_groups) == (4, 8, True)
    assert (c.weight_format, c.act_format) == ("fp4_e2m1", "fp8_e4m3")
    assert ZQFPConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    int8 = ZQFPConfig(weight_format="int8", act_format="none")
    assert (int8.abits, int8.act_spec.bits, int8.act_spec.quantized) == (0, 16, False)
    assert ZQFPConfig(weight_format="int4").block_config is None
    assert ZQFPConfig(scale_constraint="m2").block_config == BlockScaledConfig(
        "fp4_e2m1", 128, "fp16", "m2"
    )
    bad = [
        ({"bits": 8}, "contradicts the weight format"),
        ({"abits": 4}, "contradicts the activation format"),
        ({"weight_format": "int4", "scale_constraint": "m2"}, "applies to FP"),
        ({"scale_constraint": "m3"}, "unknown"),
        ({"act_format": "uint8"}, "signed"),
        ({"weight_format": "fp9"}, "unknown number format"),
        ({"act_granularity": "channel"}, "granularity"),
        ({"group_size": -1, "scale_constraint": "m2"}, "needs groups"),
        ({"static_groups": False}, "permutation"),
        ({"symmetric": False}, "symmetric"),
        ({"lorc_rank": -1}, "lorc_rank"),
    ]
    for kwargs, needle in bad:
        with pytest.raises(LowbitError, match=needle):
            ZQFPConfig(**kwargs)
    ZQFPConfig(static_groups=False, act_order=False)  # dynamic groups are fine without act-order
    ZQFPConfig(weight_format="int4", static_groups=False)  # int weights store the permutation


def _ppl(loaded):
    windows = eval_windows(loaded.tokenizer, load_text("austen-pp"), 256, 2048, False)
    return perplexity(loaded.model, windows, progress=False).ppl


@pytest.fixture(scope="module")
def m2_saved(smollm2_2blocks, tmp_path_factory):
    """W4A8 FP-FP, M2, static per-tensor FP8 activations, LoRC rank 8: quantized and saved."""
    loaded = api.load_model(str(smollm2_2blocks))
    cfg = {"group_size": 64, "scale_constraint": "m2", "lorc_rank": 8, "act_granularity": "tensor"}
    result = api.quantize(loaded, api.build_config("zqfp", cfg), CALIB, progress=False)
    out = api.save_quantized(loaded, result, tmp_path_factory.mktemp("zqfp") / "q")
    return loaded, result, out


def test_save_reload_is_exact_with_activation_quant(m2_saved):
    loaded, _, out = m2_saved
    reloaded = api.load_model(str(out))
    layers = [m for m in reloaded.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    assert all(m.act_quant is not None and m.act_quant.scale is not None for m in layers)
    assert all(m.lowrank is not None and m.lowrank.rank == 8 for m in layers)
    assert _ppl(reloaded) == _ppl(loaded)  # the same float, not approximately
    assert_same_logits(loaded.model, reloaded.model)


def test_manifest_says_simulated_and_bits_match_saved_bytes(m2_saved):
    _, result, out = m2_saved
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["activations"]["quantized"] == ["fp8_e4m3 per-tensor"]
    assert "simulated" in manifest["activations"]["execution_cpu"]
    assert all("simulated" in r.extra["activations"] for r in result.layers)
    quant_bits, numel = 0, 0
    with safe_open(str(out / WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
        for name, layer in manifest["layers"].items():
            assert layer["lowrank"]["rank"] == 8 and layer["act_quant"]["format"] == "fp8_e4m3"
            numel += layer["weight"]["in_features"] * layer["weight"]["out_features"]
            for key in keys:
                if key.startswith(name + ".") and not key.endswith(".bias"):
                    t = f.get_tensor(key)
                    quant_bits += 8 * t.numel() * t.element_size()
    assert quant_bits / numel == pytest.approx(manifest["avg_bits"], rel=1e-12)
    # FP4 codes + one E8M0 ratio per 64 weights + fp16 row scale + fp16 rank-8 factors + the
    # fp32 static activation scale, per layer
    expected = sum(
        4 * r * c + 8 * r * c / 64 + 16 * r + 16 * 8 * (r + c) + 32
        for r, c in (
            (lay["weight"]["out_features"], lay["weight"]["in_features"])
            for lay in manifest["layers"].values()
        )
    )
    assert manifest["avg_bits"] == pytest.approx(expected / numel, rel=1e-12)


def test_m2_scales_in_checkpoint_are_powers_of_two(m2_saved):
    _, _, out = m2_saved
    manifest = json.loads((out / "lowbit.json").read_text())
    e8m0 = get_format("e8m0")
    with safe_open(str(out / WEIGHTS), framework="pt") as f:
        for name, layer in manifest["layers"].items():
            assert layer["weight"]["config"]["scale_rule"] == "m2"
            ratios = e8m0.decode(f.get_tensor(f"{name}.scales"))  # 2**k exactly, by format
            assert f.get_tensor(f"{name}.scales").dtype == torch.uint8
            assert torch.all(torch.frexp(ratios)[0] == 0.5)
            assert f.get_tensor(f"{name}.row_scales").dtype == torch.float16


def test_cli_m1_int8_static_writes_simulated_report(smollm2_2blocks, tmp_path, capsys):
    argv = [
        "quantize",
        str(smollm2_2blocks),
        "--method",
        "zqfp",
        "--weight-format",
        "fp4_e2m1",
        "--act-format",
        "int8",
        "--act-granularity",
        "tensor",
        "--group-size",
        "64",
        "--scale-constraint",
        "m1",
        "--ignore",
        "*.mlp.*",
        "--nsamples",
        "4",
        "--seqlen",
        "64",
        "--out",
        str(tmp_path / "q"),
        "--json",
        str(tmp_path / "r.json"),
    ]
    assert main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["scale_constraint"] == "m1"
    assert report["config"]["abits"] == 0  # as given: from --act-format (act_spec.bits 8)
    assert len(report["layers"]) == 8  # attention only
    assert all(r["extra"]["activations"] == "int8 per-tensor, simulated" for r in report["layers"])
    assert report["avg_bits"] == pytest.approx(4 + 8 / 64, abs=1e-3)  # + one fp32 act scale
    with safe_open(str(tmp_path / "q" / WEIGHTS), framework="pt") as f:
        scales = f.get_tensor("model.layers.0.self_attn.q_proj.scales")
        assert scales.dtype == torch.uint8  # E8M0 codes: 2**(code - 127), powers of two only
        assert "model.layers.0.mlp.up_proj.weight" in f.keys()  # noqa: SIM118
    assert (
        main(
            [
                "quantize",
                str(smollm2_2blocks),
                "--method",
                "zqfp",
                "--scale-constraint",
                "m2",
                "--weight-format",
                "int4",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "applies to FP weight formats" in capsys.readouterr().err
