"""The architecture matrix on tiny random-weight models (lowbit.models.tiny; no download):
quantize, save, reload with identical logits, generate. The default suite runs one method per
architecture (rotating through the methods); ``-m slow`` runs every method on every one.
docs/ARCHITECTURES.md's table comes from ``-m slow`` runs of this file."""

from __future__ import annotations

import pytest
import torch

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.models.tiny import save_tiny

ARCHS = [
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma2", "gemma3_text",
    "phi3", "olmo2", "granite", "starcoder2", "gpt_neox", "falcon", "gpt2", "opt", "cohere",
    "smollm3", "glm4",
]
CALIB = api.CalibSpec(nsamples=4, seqlen=32, batch_size=4)
METHODS = {
    "rtn": {"bits": 4, "group_size": 32},
    "gptq": {"bits": 4, "group_size": 32},
    "spqr": {"bits": 3, "group_size": 16},
    "zqfp": {"group_size": 32},  # FP4 weights, FP8 activations
    "smoothquant": {"bits": 8, "abits": 8},
    "qllm": {"bits": 4, "abits": 8, "correction": False},
    "lrqat": {"bits": 4, "group_size": 32, "steps": 2, "batch_size": 2, "train_seqlen": 32,
              "checkpoint_every": 0},
    "clip": {"bits": 4, "group_size": 32},
}
# Smoothing folds into a norm feeding linears directly: a block without one is refused (QLLM
# keeps its divisors in the gather where no norm takes them).
NEEDS_NORM_FEED = {"smoothquant"}
NO_NORM_FEED = {"olmo2"}
IDS = torch.arange(3, 43).reshape(2, 20)


def _default_cases() -> list[tuple[str, str]]:
    names = list(METHODS)
    return [(arch, names[i % len(names)]) for i, arch in enumerate(ARCHS)]


def _all_cases() -> list:
    default = set(_default_cases())
    return [
        pytest.param(arch, method, marks=pytest.mark.slow)
        for arch in ARCHS for method in METHODS if (arch, method) not in default
    ]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    cache: dict[str, str] = {}

    def folder(arch: str) -> str:
        if arch not in cache:
            cache[arch] = str(save_tiny(arch, root / arch))
        return cache[arch]

    return folder


@pytest.mark.parametrize("arch,method", _default_cases() + _all_cases())
def test_quantize_save_reload_generate(arch, method, tiny_folders, tmp_path):
    loaded = api.load_model(tiny_folders(arch))
    config = api.build_config(method, METHODS[method])
    if method in NEEDS_NORM_FEED and arch in NO_NORM_FEED:
        with pytest.raises(LowbitError, match="no norm feeds"):
            api.quantize(loaded, config, CALIB, progress=False)
        return
    result = api.quantize(loaded, config, CALIB, progress=False)
    assert result.layers and 2 < result.avg_bits < 16
    out = api.save_quantized(loaded, result, tmp_path / "q")
    again = api.load_model(str(out))
    with torch.no_grad():
        want = loaded.model(IDS).logits
        got = again.model(IDS).logits
        assert torch.equal(want, got)
        generated = again.model.generate(IDS[:1, :8], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_every_expert_is_quantized_with_its_token_count(arch, tiny_folders):
    loaded = api.load_model(tiny_folders(arch))
    result = api.quantize(loaded, api.build_config("gptq", METHODS["gptq"]), CALIB,
                          progress=False)
    experts = [r for r in result.layers if ".mlp.experts." in r.name]
    assert len(experts) == 2 * 4 * 3  # 2 blocks x 4 experts x gate, up, down
    routed = {r.name: r.extra["calib_tokens"] for r in experts}
    per_token = 2  # top-2 routing: every token reaches two experts
    for block in (0, 1):
        ups = [routed[f"model.layers.{block}.mlp.experts.{e}.up_proj"] for e in range(4)]
        assert sum(ups) == per_token * CALIB.nsamples * CALIB.seqlen
    assert not any(".mlp.gate" in r.name for r in result.layers)  # routers stay float


@pytest.mark.parametrize("arch", [
    "qwen3_moe", "gpt2", "falcon",
    *[pytest.param(a, marks=pytest.mark.slow) for a in ARCHS
      if a not in ("qwen3_moe", "gpt2", "falcon")],
])
def test_command_line_quantizes_a_saved_folder(arch, tiny_folders, tmp_path, capsys):
    import json

    from lowbit.cli.main import main

    report = tmp_path / "r.json"
    code = main(["quantize", tiny_folders(arch), "--method", "gptq", "--bits", "4", "-g", "32",
                 "--nsamples", "4", "--seqlen", "32", "--out", str(tmp_path / "q"),
                 "--json", str(report)])
    assert code == 0, capsys.readouterr().err
    layers = json.loads(report.read_text())["layers"]
    assert all(r["extra"]["calib_tokens"] > 0 for r in layers if ".experts." not in r["name"])
    printed = capsys.readouterr().out
    if arch in ("qwen3_moe", "mixtral"):
        experts = [r for r in layers if ".experts." in r["name"]]
        assert len(experts) == 24 and all("calib_tokens" in r["extra"] for r in experts)
        assert "calibration tokens per expert" in printed and "model.layers.1.mlp" in printed
    else:
        assert "calibration tokens per expert" not in printed


def test_calibrating_every_expert_on_every_token(tiny_folders):
    loaded = api.load_model(tiny_folders("qwen3_moe"))
    with torch.no_grad():
        want = loaded.model(IDS).logits
    calib = api.CalibSpec(nsamples=4, seqlen=32, batch_size=4, all_experts=True)
    result = api.quantize(loaded, api.build_config("rtn", METHODS["rtn"]), calib, progress=False)
    experts = [r for r in result.layers if ".mlp.experts." in r.name]
    assert len(experts) == 24
    assert all(r.extra["calib_tokens"] == 4 * 32 for r in experts)
    with torch.no_grad():  # the experts are quantized, the routing and the outputs still work
        got = loaded.model(IDS).logits
    assert got.shape == want.shape and not torch.equal(got, want)
