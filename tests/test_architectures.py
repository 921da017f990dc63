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


def _config(model) -> dict:
    skip = {"quantization_config", "lowbit", "dtype", "torch_dtype", "transformers_version",
            "_name_or_path"}
    return {k: v for k, v in model.config.to_dict().items() if k not in skip}


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
    # everything the forward reads from the config (soft-capping, sliding windows, partial
    # rotary, parallel attention, tied embeddings) comes back as it was
    assert _config(again.model) == _config(loaded.model)
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
    # RTN calibrates only to report output errors (its weights need no data): ask for them
    config = api.build_config("rtn", {**METHODS["rtn"], "output_error": True})
    result = api.quantize(loaded, config, calib, progress=False)
    experts = [r for r in result.layers if ".mlp.experts." in r.name]
    assert len(experts) == 24
    assert all(r.extra["calib_tokens"] == 4 * 32 for r in experts)
    with torch.no_grad():  # the experts are quantized, the routing and the outputs still work
        got = loaded.model(IDS).logits
    assert got.shape == want.shape and not torch.equal(got, want)


# Export where the format applies: compressed-tensors (weight-only int4 g32 from RTN) loaded back
# by transformers (dequantized) with the logits of lowbit's own reload. GPT-2's Conv1D models
# are refused (transformers' quantized loaders replace nn.Linear only).
EXPORT_DEFAULT = ("llama", "mixtral", "phi3", "falcon")
CT_TOLERANCE = 2e-3  # max relative logit error: fp16 scales in the export (3e-4 seen)


@pytest.mark.parametrize("arch", [
    *EXPORT_DEFAULT,
    *[pytest.param(a, marks=pytest.mark.slow) for a in ARCHS
      if a not in EXPORT_DEFAULT and a != "gpt2"],
])
def test_compressed_tensors_export_loads_with_the_same_logits(arch, tiny_folders, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from lowbit.export.compressed_tensors import export_compressed_tensors

    loaded = api.load_model(tiny_folders(arch))
    result = api.quantize(loaded, api.build_config("rtn", METHODS["rtn"]), CALIB, progress=False)
    folder = api.save_quantized(loaded, result, tmp_path / "q")
    out = export_compressed_tensors(folder, tmp_path / "ct")
    hf = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    with torch.no_grad():
        want = api.load_model(str(folder)).model(IDS).logits
        got = hf(IDS).logits
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= CT_TOLERANCE, f"{arch}: max relative logit error {err:.3g}"


def test_exports_refuse_conv1d_models(tiny_folders, tmp_path):
    from lowbit.export.compressed_tensors import export_compressed_tensors

    loaded = api.load_model(tiny_folders("gpt2"))
    result = api.quantize(loaded, api.build_config("rtn", METHODS["rtn"]), CALIB, progress=False)
    folder = api.save_quantized(loaded, result, tmp_path / "q")
    with pytest.raises(LowbitError, match="Conv1D"):
        export_compressed_tensors(folder, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_mixtral_exports_under_the_names_transformers_writes(tiny_folders, tmp_path):
    from safetensors import safe_open

    from lowbit.export.compressed_tensors import export_compressed_tensors

    loaded = api.load_model(tiny_folders("mixtral"))
    result = api.quantize(loaded, api.build_config("rtn", METHODS["rtn"]), CALIB, progress=False)
    out = export_compressed_tensors(api.save_quantized(loaded, result, tmp_path / "q"),
                                    tmp_path / "ct")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    with safe_open(str(tiny_folders("mixtral") + "/model.safetensors"), "pt") as f:
        modules = {k.rsplit(".", 1)[0] for k in f.keys() if ".experts." in k}
    assert len(modules) == 2 * 4 * 3 and all(".block_sparse_moe.experts." in m for m in modules)
    assert {f"{m}.weight_packed" for m in modules} <= keys
    assert not any(".mlp.experts." in k for k in keys)


def test_gemma2_soft_capping_and_sliding_window_act_after_quantization(tmp_path):
    """Gemma-2's final logit soft-capping and sliding-window attention are the model's
    forward, untouched by quantization: a quantized, reloaded model's logits stay inside the
    cap, and positions past the window see a different context than with the window off."""
    cap, window = 0.5, 4
    folder = save_tiny("gemma2", tmp_path / "g", final_logit_softcapping=cap,
                       sliding_window=window)
    loaded = api.load_model(str(folder))
    result = api.quantize(loaded, api.build_config("gptq", METHODS["gptq"]), CALIB,
                          progress=False)
    again = api.load_model(str(api.save_quantized(loaded, result, tmp_path / "q")))
    assert again.model.config.final_logit_softcapping == cap
    assert again.model.config.sliding_window == window
    assert "sliding_attention" in again.model.config.layer_types
    with torch.no_grad():
        windowed = again.model(IDS).logits
        assert float(windowed.abs().max()) < cap
        again.model.config.sliding_window = 1000
        full = again.model(IDS).logits
    assert torch.allclose(windowed[:, :window], full[:, :window], atol=1e-6)
    assert not torch.allclose(windowed[:, window + 1:], full[:, window + 1:], atol=1e-4)


def test_tied_embeddings_stay_tied_and_qk_norms_stay_float(tmp_path):
    folder = str(save_tiny("qwen3", tmp_path / "m", tie_word_embeddings=True))
    loaded = api.load_model(folder)
    result = api.quantize(loaded, api.build_config("rtn", METHODS["rtn"]), CALIB, progress=False)
    again = api.load_model(str(api.save_quantized(loaded, result, tmp_path / "q")))
    model = again.model
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    attn = model.model.layers[0].self_attn
    for norm in (attn.q_norm, attn.k_norm):
        assert type(norm).__name__.endswith("RMSNorm") and norm.weight.is_floating_point()
    source = api.load_model(folder).model.model.layers[0].self_attn
    assert torch.equal(attn.q_norm.weight, source.q_norm.weight)


def test_spqr_layout_refuses_mixture_of_experts(tiny_folders, tmp_path):
    from lowbit.export.spqr_layout import export_spqr

    loaded = api.load_model(tiny_folders("qwen3_moe"))
    config = api.build_config("spqr", METHODS["spqr"])
    result = api.quantize(loaded, config, CALIB, progress=False)
    folder = api.save_quantized(loaded, result, tmp_path / "q")
    with pytest.raises(LowbitError, match="mixture-of-experts"):
        export_spqr(folder, tmp_path / "s")
    assert not (tmp_path / "s").exists()
