"""transformers integration (``from_pretrained`` on a lowbit DIR), export provenance, and the
``lowbit export`` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from export_util import build_dir, int_weight, logits

from lowbit.cli.main import main
from lowbit.export.lowbit_format import load_quantized
from lowbit.export.provenance import dir_sha256

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def int4_dir(smollm2_2blocks, tmp_path_factory):
    return build_dir(smollm2_2blocks, tmp_path_factory.mktemp("int4") / "q",
                     int_weight(4, 64, True), method="rtn")


def test_import_lowbit_is_cheap_and_registers_with_transformers():
    code = "import sys, lowbit; assert not {'torch', 'transformers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
    import transformers.quantizers.auto as auto

    assert "lowbit" in auto.AUTO_QUANTIZER_MAPPING
    assert "lowbit" in auto.AUTO_QUANTIZATION_CONFIG_MAPPING


def test_from_pretrained_on_lowbit_dir_gives_load_quantized_logits(int4_dir):
    from transformers import AutoModelForCausalLM

    from lowbit.nn.quant_linear import QuantLinear

    model = AutoModelForCausalLM.from_pretrained(int4_dir, dtype=torch.float32)
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert model.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16
    assert torch.equal(logits(load_quantized(int4_dir)[0]), logits(model))


def test_cli_export_writes_provenance(int4_dir, tmp_path, capsys):
    out = tmp_path / "ct"
    assert main(["export", str(int4_dir), "--format", "compressed-tensors", "--out", str(out)]) == 0
    assert "compressed-tensors: pack-quantized" in capsys.readouterr().out
    record = json.loads((out / "config.json").read_text())["lowbit_export"]
    assert record["source_dir_sha256"] == dir_sha256(int4_dir)
    assert record["method"] == "rtn" and record["lowbit_version"]
    assert record["recipe"] == [{"method": "rtn"}]
    assert (out / "tokenizer.json").is_file() and not (out / "lowbit.json").exists()
    gptq = tmp_path / "gptq"
    assert main(["export", str(int4_dir), "--format", "gptq", "--out", str(gptq)]) == 0
    quantize_config = json.loads((gptq / "quantize_config.json").read_text())
    assert quantize_config["lowbit_export"]["source_dir_sha256"] == record["source_dir_sha256"]
    assert json.loads((gptq / "config.json").read_text())["lowbit_export"] == record | {
        "format": "gptq"
    }


def test_dir_hash_changes_with_any_file(tmp_path):
    (tmp_path / "a").write_text("x")
    before = dir_sha256(tmp_path)
    (tmp_path / "b").write_text("")
    assert dir_sha256(tmp_path) != before


def test_cli_refusal_is_one_line_exit_2(smollm2_2blocks, tmp_path, capsys):
    src = build_dir(smollm2_2blocks, tmp_path / "q", int_weight(3, 64, True))
    out = tmp_path / "ct"
    assert main(["export", str(src), "--format", "compressed-tensors", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error: layer model.layers.0.") and "\n" not in err
    assert "3-bit" in err and "Exportable: INT4/INT8" in err and "NVFP4" in err
    assert not out.exists()
    assert main(["export", str(src), "--format", "gptq", "--out", str(src)]) == 2
