"""Inference: static-cache greedy decoding against Hugging Face ``generate``, a quantized model's
fast kernels against the reference at model level, bytes per token, and ``lowbit bench decode``
end to end on a real model cut to two blocks (tiny settings: speed itself is measured by
benchmarks/decode.sh, not here)."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit import api
from lowbit.cli.main import main
from lowbit.infer.decode import Decoder
from lowbit.infer.footprint import weight_bytes_per_token
from lowbit.infer.prepare import path_counts, prepare_model
from lowbit.nn.quant_linear import QuantLinear

CALIB = api.CalibSpec(nsamples=2, seqlen=32, batch_size=2)


def _hf_greedy(model, ids, n):
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_static_cache_decoding_matches_hf_generate_llama(smollm2_2blocks):
    loaded = api.load_model(str(smollm2_2blocks))
    ids = loaded.tokenizer("It is a truth universally acknowledged", return_tensors="pt")
    ids = ids["input_ids"]
    run = Decoder(loaded.model, ids.shape[1] + 8).generate(ids, 8)
    assert run.new_tokens.tolist() == _hf_greedy(loaded.model, ids, 8)
    assert len(run.step_seconds) == 7 and run.decode_tokens_per_second > 0


def test_static_cache_decoding_matches_hf_generate_sliding_window():
    """Gemma-3 layout (sliding and full attention layers) with a window of 4 positions, so the
    sliding cache wraps around during the 12 positions decoded."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    model = Gemma3ForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 5))
    run = Decoder(model, 12).generate(ids, 7)
    assert run.new_tokens.tolist() == _hf_greedy(model, ids, 7)


@pytest.fixture(scope="module")
def rtn_dir(smollm2_2blocks, tmp_path_factory):
    loaded = api.load_model(str(smollm2_2blocks))
    result = api.quantize(loaded, api.build_config("rtn", {"bits": 4, "group_size": 64}), CALIB,
        progress=False)
    return api.save_quantized(loaded, result, tmp_path_factory.mktemp("q") / "rtn-w4g64")


def test_quantized_model_fast_kernels_match_reference_logits(rtn_dir):
    """Whole model in bf16: int4 kernels vs the reference dequantize-and-matmul in bf16, both
    against the fp32 reference; the fast path may not be much further from fp32 than bf16
    itself is."""
    ids = torch.arange(100, 132)[None]
    fp32 = api.load_model(str(rtn_dir)).model
    with torch.inference_mode():
        exact = fp32(ids).logits.float()
    loaded = api.load_model(str(rtn_dir), torch.bfloat16)
    assert path_counts(prepare_model(loaded.model)) == {"int4": 14}
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    errors = {}
    for kernel in ("auto", "reference"):
        for m in layers:
            m.set_kernel_mode(kernel)
        with torch.inference_mode():
            logits = loaded.model(ids).logits.float()
        errors[kernel] = float((logits - exact).norm() / exact.norm())
    assert all(m._dequantized is not None for m in layers)  # the reference run built them
    assert errors["auto"] < max(1.5 * errors["reference"], 1e-2), errors


def test_weight_bytes_count_embeddings_once_and_kernels_as_read():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # untied: the embedding reads one row of 64 fp32 values per token
    assert weight_bytes_per_token(model) == 4 * (params - 256 * 64 + 64) + buffers
    config.tie_word_embeddings = True
    tied = LlamaForCausalLM(config)
    tied_params = sum(p.numel() for p in tied.parameters())  # shared matrix listed once
    assert weight_bytes_per_token(tied) == 4 * tied_params + buffers


def test_bench_decode_cli_json(rtn_dir, smollm2_2blocks, tmp_path, capsys):
    out = tmp_path / "speed.json"
    argv = ["bench", "decode", str(rtn_dir), "--tokens", "4", "--prompt-len", "16",
            "--no-compile", "--prefill-repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "x fp32" in printed and "quantized: decode vs fp32" in printed
    report = json.loads(out.read_text())
    variants = {(v["label"], v["dtype"]): v for v in report["variants"]}
    assert set(variants) == {("quantized", "bf16"), ("base", "fp32"), ("base", "bf16")}
    q, f32, b16 = variants["quantized", "bf16"], variants["base", "fp32"], variants["base", "bf16"]
    assert q["kernel_paths"] == {"int4": 14} and report["method"] == "rtn"
    assert q["weight_bytes_per_token"] < b16["weight_bytes_per_token"]
    assert 2 * b16["weight_bytes_per_token"] == pytest.approx(f32["weight_bytes_per_token"], 1e-3)
    for v in report["variants"]:
        assert v["decode_tokens_per_s"] > 0 and v["prefill_tokens_per_s"] > 0
        assert v["kv_cache_bytes"] > 0 and 0 < v["fraction_of_copy_bandwidth"] < 10
    assert set(report["ratios"]) == {"decode_vs_fp32", "decode_vs_bf16", "prefill_vs_fp32",
                                     "prefill_vs_bf16"}
    assert report["machine"]["copy_gbs"] > 0 and report["base_model"] == str(smollm2_2blocks)


@pytest.mark.slow
def test_compiled_decode_step_has_no_graph_breaks(rtn_dir):
    import torch._dynamo

    loaded = api.load_model(str(rtn_dir), torch.bfloat16)
    prepare_model(loaded.model)
    ids = torch.arange(100, 110)[None]
    torch._dynamo.utils.counters.clear()
    decoder = Decoder(loaded.model, 32, compile=True)
    decoder.warm_up(ids)
    assert decoder.compiled and decoder.compile_note is None
    assert not torch._dynamo.utils.counters["graph_break"]
    assert len(decoder.generate(ids, 8).new_tokens) == 8


def test_generate_cli_uses_fast_kernels_and_static_cache(rtn_dir, capsys):
    argv = ["generate", str(rtn_dir), "--prompt", "It is a truth", "--max-new-tokens", "4"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("It is a truth")
    assert "kernels: 14 int4; static KV cache" in captured.err


def test_bench_decode_bad_model_is_one_line_error(tmp_path, capsys):
    assert main(["bench", "decode", str(tmp_path / "missing"), "--no-compile"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error: model") and "\n" not in err
