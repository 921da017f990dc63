"""LR-QAT end to end on SmolLM2 cut to two blocks: PTQ start, training lowers the loss, the
merged model saves and reloads as a plain integer checkpoint, the command line."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit import api
from lowbit.cli.main import main
from lowbit.data.calibration import calibration_batch
from lowbit.data.corpora import load_text
from lowbit.nn.quant_linear import QuantLinear

CALIB = api.CalibSpec(nsamples=4, seqlen=64, batch_size=4)
TRAIN = {"batch_size": 2, "train_seqlen": 48, "checkpoint_every": 0}


def _quant(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("group_size", [-1, 64])  # act-order permutation; static groups
def test_gptq_start_without_steps_is_the_gptq_model(smollm2_2blocks, group_size):
    grid = {"bits": 3, "group_size": group_size}
    gptq = api.load_model(str(smollm2_2blocks))
    api.quantize(gptq, api.build_config("gptq", {**grid, "static_groups": group_size != -1}),
        CALIB, progress=False)
    lrqat = api.load_model(str(smollm2_2blocks))
    result = api.quantize(lrqat, api.build_config("lrqat", {**grid, "init": "gptq", "steps": 0}),
        CALIB, progress=False
    )
    want, got = _quant(gptq.model), _quant(lrqat.model)
    assert want.keys() == got.keys() and len(got) == 14
    for name in want:
        assert torch.equal(got[name].dequantized_weight(), want[name].dequantized_weight()), name
    assert all("init_hessian_rel_err" in r.extra for r in result.layers)


def _loss(loaded, ids) -> float:
    with torch.no_grad():
        return float(loaded.model(input_ids=ids, labels=ids).loss)


def test_training_lowers_the_loss_and_reloads_exactly(smollm2_2blocks, tmp_path):
    cfg = {"bits": 3, "alpha": 32.0, "lr": 1e-2, "scale_lr": 1e-3, **TRAIN}
    before = api.load_model(str(smollm2_2blocks))
    api.quantize(before, api.build_config("lrqat", {**cfg, "steps": 0}), CALIB, progress=False)
    loaded = api.load_model(str(smollm2_2blocks))
    result = api.quantize(loaded, api.build_config("lrqat", {**cfg, "steps": 8}), CALIB,
        progress=False)
    held_out = calibration_batch(loaded.tokenizer, load_text("austen-pp")[:20000], 4, 64, 0)
    assert _loss(loaded, held_out) < 0.9 * _loss(before, held_out)  # measured 0.739
    facts = result.extra["training"]
    assert facts["mode"] == "lrqat" and len(facts["losses"]) == 8
    assert facts["tokens"] == 8 * 2 * 48 and facts["sec_per_step"] > 0
    out = api.save_quantized(loaded, result, tmp_path / "q")
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["method"] == "lrqat" and manifest["training"]["steps"] == 8
    reloaded = api.load_model(str(out))
    assert reloaded.manifest["avg_bits"] == result.avg_bits
    ids = held_out[:1, :20]
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids).logits, loaded.model(ids).logits)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert not any("lora" in k or "phi0" in k for k in keys)
    layers = _quant(loaded.model).values()  # plain 3-bit codes + an fp16 scale per row
    numel = sum(q.in_features * q.out_features for q in layers)
    assert result.avg_bits == (3 * numel + 16 * sum(q.out_features for q in layers)) / numel


def test_cli_full_qat_json_and_eval(smollm2_2blocks, tmp_path, capsys):
    out, report = tmp_path / "q", tmp_path / "q.json"
    argv = ["quantize", str(smollm2_2blocks), "--method", "lrqat", "--full-qat", "--bits", "4"]
    argv += ["--steps", "2", "--batch-size", "1", "--train-seqlen", "32", "--checkpoint-every", "1"]
    assert main([*argv, "--out", str(out), "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    training = data["training"]
    assert training["mode"] == "full_qat" and training["steps"] == 2
    assert training["peak_rss_mb"] > 0 and training["state_mb"]["optimizer"] > 0
    assert data["config"]["full_qat"] is True
    assert not (tmp_path / "q.ckpt").exists()  # finished: the checkpoint is gone
    assert main(["eval", str(out), "--ppl", "austen-pp", "--max-tokens", "512"]) == 0
    assert "austen-pp" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--method", "gptq", "--percdamp", "0"], "percdamp must be in (0, 10]"),
        (["--method", "lrqat", "--asym"], "drop --asym"),
        (["--method", "rtn", "--rank", "8"], "--rank does not apply to method 'rtn'"),
    ],
)
def test_cli_errors(smollm2_2blocks, tmp_path, capsys, extra, needle):
    code = main(["quantize", str(smollm2_2blocks), *extra, "--out", str(tmp_path / "o")])
    assert code == 2 and needle in capsys.readouterr().err


def test_cli_refuses_to_overwrite_a_checkpoint_without_resume(smollm2_2blocks, tmp_path, capsys):
    (tmp_path / "o.ckpt").mkdir()
    (tmp_path / "o.ckpt" / "state.pt").write_bytes(b"")
    argv = ["quantize", str(smollm2_2blocks), "--method", "lrqat", "--steps", "1"]
    code = main([*argv, "--batch-size", "1", "--train-seqlen", "16", "--out", str(tmp_path / "o")])
    assert code == 2 and "pass --resume" in capsys.readouterr().err
