"""The command-line contract: exit codes, one-line errors, JSON results, tables."""

from __future__ import annotations

import json
import math

import pytest

from lowbit.cli.main import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (
            ["quantize", "no-such-model", "--method", "gptq", "--out", "{tmp}/o"],
            "unknown model or path",
        ),
        (["quantize", "{model}", "--method", "magic", "--out", "{tmp}/o"], "unknown method"),
        (
            ["quantize", "{model}", "--method", "gptq", "--bits", "9", "--out", "{tmp}/o"],
            "bits must be between 2 and 8",
        ),
        (
            ["quantize", "{model}", "--method", "gptq", "--group-size", "100", "--out", "{tmp}/o"],
            "group sizes that divide every width: 8, 12, 16, 24, 32, 48, 64, 96, 192",
        ),
        (
            [
                "quantize",
                "{model}",
                "--method",
                "rtn",
                "--calib",
                "nope",
                "-g",
                "64",
                "--out",
                "{tmp}/o",
            ],
            "nope",
        ),
        (
            ["quantize", "{model}", "--method", "rtn", "--percdamp", "0.1", "--out", "{tmp}/o"],
            "--percdamp does not apply to method 'rtn'",
        ),
        (
            ["quantize", "{model}", "--method", "gptq", "--out", "{tmp}/occupied"],
            "exists and is not a lowbit output",
        ),
        (["eval", "{model}", "--ppl", "no-such-corpus"], "no-such-corpus"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, smollm2_2blocks, argv, needle):
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "keep.txt").write_text("user data")
    argv = [a.format(tmp=tmp_path, model=smollm2_2blocks) for a in argv]
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert err.startswith("lowbit: error: ") and err.count("\n") == 1, err
    assert needle in err
    assert "Traceback" not in err
    assert (tmp_path / "occupied" / "keep.txt").read_text() == "user data"
    assert not (tmp_path / "o").exists()


def test_recipe_unknown_key_is_named(capsys, tmp_path, smollm2_2blocks):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: gptq\nbits: 4\nperc_damp: 0.1\n")
    code, _, err = _run(
        capsys,
        "quantize",
        str(smollm2_2blocks),
        "--method",
        "gptq",
        "--recipe",
        str(recipe),
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 2 and "unknown key 'perc_damp'" in err and "percdamp" in err


def test_quantize_then_eval_json(capsys, tmp_path, smollm2_2blocks):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- method: gptq\n  bits: 3\n  act_order: false\n")
    out_dir = tmp_path / "q"
    code, out, err = _run(
        capsys,
        "quantize",
        str(smollm2_2blocks),
        "--method",
        "gptq",
        "--recipe",
        str(recipe),
        "--group-size",
        "64",
        "--nsamples",
        "4",
        "--seqlen",
        "64",
        "--out",
        str(out_dir),
        "--json",
        str(tmp_path / "q.json"),
    )
    assert code == 0, err
    assert "model.layers.1" in out and "bits/weight over quantized linears" in out
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["config"]["act_order"] is False and report["config"]["bits"] == 3
    assert report["avg_bits"] == pytest.approx(3 + 16 / 64)
    code, out, err = _run(
        capsys,
        "eval",
        str(out_dir),
        "--ppl",
        "austen-pp",
        "--max-tokens",
        "256",
        "--eval-seqlen",
        "128",
        "--kld",
        "--json",
        str(tmp_path / "e.json"),
    )
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    for key in ("model", "method", "avg_bits", "ppl", "kld", "seconds", "peak_rss_mb"):
        assert key in result
    assert result["method"] == "gptq" and result["kld"] > 0
    assert math.isfinite(result["ppl"]["austen-pp"]) and result["ppl"]["austen-pp"] > 1


def test_models_lists_bundled(capsys, tmp_path):
    code, out, _ = _run(capsys, "models", "--json", str(tmp_path / "m.json"))
    assert code == 0 and "smollm2-135m" in out and "gemma3-270m" in out
    names = [m["name"] for m in json.loads((tmp_path / "m.json").read_text())]
    assert names == ["smollm2-135m", "gemma3-270m"]
