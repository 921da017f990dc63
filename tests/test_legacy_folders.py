"""Folders written before the typed-core refactor (issue #18) load with today's code and give
the same results: the same quantized layers and the logits the old code gave, to float
summation order (bit for bit on the machine that recorded them; another CPU's matmul kernels
sum in another order, 2e-7 apart on logits of about 1, where a wrong grid or scale moves them
by 1e-2 or more).

``tests/data/legacy_v1/<case>/`` are lowbit DIRs saved by lowbit at commit 1f8a6a6 (before the
refactor) by ``scripts/make_legacy_fixtures.py`` (its docstring says how it was run): a tiny
random-weight Llama (vocabulary 512, byte-level tokenizer) quantized with each method. Next to
each folder's sealed files lies ``expected_logits.safetensors``, the old code's logits of the
reloaded model on fixed ids (one thread, fp32); ``cases.json`` holds each case's settings and
the old code's perplexity on ``eval.txt``. Nothing here regenerates them: a difference is a
change in what an old folder means.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lowbit import api
from lowbit.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")  # the logits were recorded on one thread

FIXTURES = Path(__file__).parent / "data" / "legacy_v1"
LOGIT_TOLERANCE = 1e-5  # of the largest |logit|: summation order, far below a wrong grid's 1e-2
PPL_TOLERANCE = 1e-6  # relative: summation order (2e-9 seen between two CPUs)
# with quantized activations a 1e-7 difference can move a value across a rounding boundary
# (3e-5 relative seen for zqfp's fp8 activations between two CPUs)
ACT_PPL_TOLERANCE = 3e-4
ACT_QUANTIZED = {"zqfp", "qllm", "smoothquant"}
RECORD = json.loads((FIXTURES / "cases.json").read_text())
CASES = RECORD["cases"]
EVAL = RECORD["eval"]
METHODS = {"rtn", "gptq", "spqr", "zqfp", "qllm", "lrqat", "smoothquant"}
N_LINEARS = 14  # 2 blocks x (q, k, v, o, gate, up, down)


def _ids() -> torch.Tensor:
    return torch.arange(40).reshape(2, 20) % 512


def _copy(case: str, tmp_path: Path) -> Path:
    """The fixture folder copied out of the repository (loading never touches the original)."""
    return Path(shutil.copytree(FIXTURES / case, tmp_path / case))


def test_the_fixture_covers_every_method_and_was_written_by_the_old_code():
    folders = {p.name for p in FIXTURES.iterdir() if p.is_dir()}
    assert folders == set(CASES) == METHODS
    assert RECORD["lowbit_commit"].startswith("1f8a6a6")
    for case in CASES:
        manifest = json.loads((FIXTURES / case / "lowbit.json").read_text())
        assert manifest["format_version"] == 1 and manifest["method"] == CASES[case]["method"]
        assert "manifest_sha256" in manifest and "model.safetensors" in manifest["files"]
        assert "expected_logits.safetensors" not in manifest["files"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_old_folder_loads_with_the_same_logits_and_perplexity(case, tmp_path):
    folder = _copy(case, tmp_path)
    recorded = load_file(str(folder / "expected_logits.safetensors"))
    assert torch.equal(recorded["ids"], _ids())
    loaded = api.load_model(str(folder))
    manifest = loaded.manifest
    assert manifest["method"] == CASES[case]["method"]
    assert manifest["avg_bits"] == CASES[case]["avg_bits"]
    assert len(manifest["layers"]) == N_LINEARS
    for name in manifest["layers"]:  # every listed linear is installed quantized
        assert type(loaded.model.get_submodule(name)) is not nn.Linear, name
    with torch.no_grad():
        logits = loaded.model(input_ids=_ids()).logits.float()
    assert logits.shape == recorded["logits"].shape
    diff = (logits - recorded["logits"]).abs().max().item()
    if diff > LOGIT_TOLERANCE * recorded["logits"].abs().max().item():
        pytest.fail(f"{case}: logits differ from the old code's (max |diff| {diff:.3g})")
    text = str(FIXTURES / EVAL["ppl"])
    scores = api.evaluate(
        loaded, [text], seqlen=EVAL["seqlen"], max_tokens=EVAL["max_tokens"], progress=False
    )
    assert scores["eval_tokens"][text] == CASES[case]["eval_tokens"]
    rel = ACT_PPL_TOLERANCE if case in ACT_QUANTIZED else PPL_TOLERANCE
    assert scores["ppl"][text] == pytest.approx(CASES[case]["ppl"], rel=rel)


@pytest.mark.parametrize("case", sorted(CASES))
def test_old_recipe_rebuilds_the_same_config(case):
    manifest = json.loads((FIXTURES / case / "lowbit.json").read_text())
    (entry,) = manifest["recipe"]
    settings = {k: v for k, v in entry.items() if k != "method"}
    config = api.build_config(entry["method"], settings)
    rebuilt = config.to_dict()
    assert set(entry) <= set(rebuilt), set(entry) - set(rebuilt)
    assert {k: rebuilt[k] for k in entry} == entry
    assert {k: entry[k] for k in CASES[case]["settings"]} == CASES[case]["settings"]


def test_cli_evaluates_an_old_folder(capsys, tmp_path):
    folder = _copy("gptq", tmp_path)
    text = str(FIXTURES / EVAL["ppl"])
    argv = ["eval", str(folder), "--ppl", text, "--max-tokens", str(EVAL["max_tokens"])]
    argv += ["--seqlen", str(EVAL["seqlen"]), "--json", str(tmp_path / "e.json")]
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["method"] == "gptq" and result["avg_bits"] == CASES["gptq"]["avg_bits"]
    assert result["eval_tokens"][text] == CASES["gptq"]["eval_tokens"]
    assert result["ppl"][text] == pytest.approx(CASES["gptq"]["ppl"], rel=PPL_TOLERANCE)
