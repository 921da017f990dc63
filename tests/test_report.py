"""``lowbit compare``: merging result JSON, the markdown table, the Pareto front, the PNGs."""

from __future__ import annotations

import json

import pytest

from lowbit.cli.main import main
from lowbit.errors import LowbitError
from lowbit.report import (
    default_metric,
    load_runs,
    markdown_table,
    pareto_front,
    parse_metric,
    plot_quality_vs_bits,
)

PNG = b"\x89PNG\r\n\x1a\n"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")


def _layers(scale):
    return [
        {
            "name": f"model.layers.{b}.{lin}",
            "bits_per_weight": 4.125,
            "weight_rel_err": scale * (1 + b + k),
            "hessian_rel_err": scale * (1 + b) / 100,
            "seconds": 0.01,
            "extra": {},
        }
        for b in range(3)
        for k, lin in enumerate(LINEARS)
    ]


def _quantize(method, bits, ppl, kld, scale):
    return {
        "model": "smollm2-135m",
        "method": method,
        "out": f"runs/m-{method}-w{bits}",
        "config": {"method": method, "bits": bits},
        "avg_bits": bits + 0.125,
        "seconds": 1.0,
        "layers": _layers(scale),
        "ppl": {"austen-pp": ppl},
        "kld": kld,
        "peak_rss_mb": 100.0,
    }


def _eval(model, avg_bits, acc, method="none"):
    return {
        "model": model,
        "method": method,
        "avg_bits": avg_bits,
        "ppl": {},
        "kld": None,
        "tasks": {
            "lowbit_cloze_austen": {"acc": acc, "acc_stderr": 0.02, "perplexity": 50.0},
            "lowbit_nextsent_austen": {"acc": acc / 2, "acc_stderr": 0.025},
        },
    }


@pytest.fixture
def results(tmp_path):
    files = {
        "base.json": {**_eval("smollm2-135m", 32.0, 0.40), "ppl": {"austen-pp": 25.0}},
        "rtn4.json": _quantize("rtn", 4, 38.0, 0.50, 0.10),
        "gptq4.json": _quantize("gptq", 4, 29.0, 0.20, 0.12),
        "rtn3.json": _quantize("rtn", 3, 300.0, 2.00, 0.30),
        "gptq3.json": _quantize("gptq", 3, 60.0, 0.90, 0.25),
        "gptq4-tasks.json": _eval("./runs/m-gptq-w4/", 4.125, 0.35, "gptq"),
    }
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    return [tmp_path / name for name in files]


def test_pareto_front():
    pts = [(4.0, 1.0), (3.0, 2.0), (4.0, 0.5), (3.0, 3.0), (8.0, 0.5), (2.0, 9.0)]
    assert pareto_front(pts) == [5, 1, 2]
    assert pareto_front(pts, lower_is_better=False) == [5]  # fewest bits, best quality
    acc = [(4.0, 0.6), (3.0, 0.5), (8.0, 0.7), (3.0, 0.4), (8.0, 0.65), (16.0, 0.7)]
    assert pareto_front(acc, lower_is_better=False) == [1, 0, 2]
    assert pareto_front([(4.0, 1.0), (4.0, 1.0)]) == [0, 1]  # ties dominate nothing


def test_runs_merge_by_model_path(results):
    runs = load_runs(results)
    assert [r.label for r in runs] == [
        "smollm2-135m",
        "m-rtn-w4",
        "m-gptq-w4",
        "m-rtn-w3",
        "m-gptq-w3",
    ]
    gptq4 = runs[2]
    assert gptq4.ppl == {"austen-pp": 29.0} and gptq4.kld == 0.20 and len(gptq4.layers) == 9
    assert gptq4.tasks["lowbit_cloze_austen"]["acc"] == 0.35
    assert gptq4.sources[-1].endswith("gptq4-tasks.json")
    assert {r.base for r in runs} == {"smollm2-135m"}  # the eval JSON of the DIR keeps its base


def test_markdown_table(results):
    table = markdown_table(load_runs(results)).splitlines()
    assert table[0] == (
        "| run | method | bits/w | ppl austen-pp | KLD | lowbit_cloze_austen acc | "
        "lowbit_cloze_austen perplexity | lowbit_nextsent_austen acc |"
    )
    assert len(table) == 2 + 5
    assert table[2].startswith("| smollm2-135m | none | 32.000 | 25.00 | - | 0.400 ± 0.020 |")
    assert table[3].startswith("| m-gptq-w4 | gptq | 4.125 | 29.00 | 0.2000 | 0.350 ± 0.020 |")
    assert "| m-rtn-w3 | rtn | 3.125 | 300.00 | 2.0000 | - | - | - |" in table


def test_metrics():
    assert parse_metric("kld").lower_is_better
    assert parse_metric("ppl:brown").name == "brown"
    acc = parse_metric("lowbit_cloze_austen:acc")
    assert (acc.kind, acc.name, acc.sub, acc.lower_is_better) == (
        "task",
        "lowbit_cloze_austen",
        "acc",
        False,
    )
    with pytest.raises(LowbitError, match="kld, ppl:CORPUS or TASK:METRIC"):
        parse_metric("accuracy")


def test_default_metric_and_missing_values(results, tmp_path):
    runs = load_runs(results)
    assert default_metric(runs).spec == "kld"
    assert default_metric(runs[:1]).spec == "ppl:austen-pp"
    with pytest.raises(LowbitError, match="no run has both avg_bits and ppl:brown"):
        plot_quality_vs_bits(runs, parse_metric("ppl:brown"), tmp_path / "x.png")


def test_compare_writes_table_and_pngs(capsys, tmp_path, results):
    out = tmp_path / "report"
    code = main(["compare", *map(str, results), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| m-gptq-w3 | gptq | 3.125 | 60.00 | 0.9000 |" in printed
    assert (out / "compare.md").read_text().startswith("| run | method |")
    for name in ("bits_vs_kld.png", "layers_m-rtn-w4.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
    code = main(
        [
            "compare",
            *map(str, results),
            "--out",
            str(out),
            "--metric",
            "lowbit_cloze_austen:acc",
            "--layers-of",
            "m-gptq-w3",
            "m-rtn-w3",
        ]
    )
    assert code == 0
    for name in (
        "bits_vs_lowbit_cloze_austen_acc.png",
        "layers_m-gptq-w3.png",
        "layers_m-rtn-w3.png",
    ):
        assert (out / name).read_bytes().startswith(PNG)
    bare = tmp_path / "bare"
    assert main(["compare", *map(str, results), "--out", str(bare), "--layers-of"]) == 0
    assert sorted(p.name for p in bare.iterdir()) == ["bits_vs_kld.png", "compare.md"]


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--metric", "bogus"], "metric 'bogus' not understood"),
        (["--layers-of", "nope"], "--layers-of nope: no such run"),
        (["{tmp}/missing.json"], "missing.json not found"),
        (["{tmp}/bad.json"], "is not a JSON file"),
    ],
)
def test_compare_bad_input_is_one_line_exit_2(capsys, tmp_path, results, extra, needle):
    (tmp_path / "bad.json").write_text("{not json")
    extra = [e.format(tmp=tmp_path) for e in extra]
    files = [e for e in extra if e.endswith(".json")]
    flags = [e for e in extra if not e.endswith(".json")]
    code = main(["compare", *map(str, results), *files, "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lowbit: error: ") and err.count("\n") == 1, err
    assert needle in err
