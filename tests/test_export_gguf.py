"""GGUF export, read back by gguf's own reader and by transformers' GGUF loader (which undoes
llama.cpp's rope row order and Gemma's ``1 + w`` norms with its own code, not lowbit's):
the weights are exactly lowbit's (float payloads: the same fp32 values; Q8_0/Q4_0/Q4_1 and
GGUF block payloads: gguf-py's dequantization equals lowbit's dequantized weight), the logits
agree, the tokenizer encodes real text to the same ids, and refusals are one-line errors."""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from export_util import build_dir, int_weight, logits, rel_err

from lowbit.data.corpora import load_text
from lowbit.errors import LowbitError
from lowbit.export.gguf_export import export_gguf
from lowbit.export.gguf_meta import rope_row_order
from lowbit.export.gguf_payload import int_payload
from lowbit.export.lowbit_format import load_quantized, quantized_layers
from lowbit.formats.gguf_blocks import fallback_type, quantize_rows
from lowbit.formats.intq import IntGrid
from lowbit.formats.packed_int import PackedIntWeight
from lowbit.models.bundled import BUNDLED
from lowbit.models.tiny import save_tiny
from lowbit.nn.act_quant import ActQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")
Q = gguf.GGMLQuantizationType


def read_back(path: Path):
    """The model transformers builds from GGUF file ``path`` (fp32, eval)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def read_back_tokenizer(path: Path):
    """The tokenizer transformers converts from GGUF file ``path``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def kv(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def types(reader: gguf.GGUFReader) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in reader.tensors}


# SmolLM2's tokenizer cut to its first ids (export_util.IDS fit): every GGUF file of a tiny
# model then parses in a fraction of the time (the full 49152 tokens and merges took ~9 s of
# CPU per file to write, read and load back)
SMALL_VOCAB = 4096


def tiny_with_smollm2_tokenizer(model_type: str, folder: Path, smollm2: Path, **overrides):
    """A tiny random ``model_type`` (:func:`save_tiny`) with SmolLM2's byte-level BPE cut to
    its first :data:`SMALL_VOCAB` ids and the merges among them (the tiny byte tokenizer has
    no merges, which a GGUF byte-level BPE needs)."""
    from transformers import AutoTokenizer

    save_tiny(model_type, folder, vocab_size=SMALL_VOCAB, bos_token_id=1, eos_token_id=2,
              **overrides)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(folder)
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {t: i for t, i in tj["model"]["vocab"].items() if i < SMALL_VOCAB}
    tj["model"]["vocab"] = vocab
    tj["model"]["merges"] = [m for m in tj["model"]["merges"]
                             if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    (folder / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tiny_model(smollm2_2blocks, tmp_path_factory):
    """conftest's random 2-block Llama (hidden 64), with the cut SmolLM2 tokenizer."""
    return tiny_with_smollm2_tokenizer("llama", tmp_path_factory.mktemp("tiny"),
                                       smollm2_2blocks, max_position_embeddings=128,
                                       tie_word_embeddings=True)


@pytest.fixture(scope="module")
def llama256(smollm2_2blocks, tmp_path_factory):
    """A random 2-block Llama of hidden 256 (K-type widths)."""
    return tiny_with_smollm2_tokenizer("llama", tmp_path_factory.mktemp("llama256"),
                                       smollm2_2blocks, hidden_size=256,
                                       intermediate_size=512, tie_word_embeddings=True)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3", "gemma3_text"])
def test_tiny_architectures_read_back_exactly(smollm2_2blocks, tmp_path, model_type):
    """Each supported architecture (Qwen2: q/k/v biases; Qwen3: q/k norms; Gemma-3: 1 + w
    norms, head size 256) in f32: transformers' GGUF loader gives the same logits."""
    src = tiny_with_smollm2_tokenizer(model_type, tmp_path / "src", smollm2_2blocks)
    from transformers import AutoModelForCausalLM

    out = export_gguf(str(src), tmp_path / "m.gguf", float_type="f32")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert rel_err(logits(ref), logits(read_back(out))) <= 1e-5


def test_rope_row_order_is_llama_cpp_interleave():
    # one head of 8 rows: transformers pairs (0,4) (1,5) (2,6) (3,7); llama.cpp pairs rows
    # (0,1) (2,3) ...: GGUF rows are transformers rows 0 4 1 5 2 6 3 7
    assert rope_row_order(8, 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert rope_row_order(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_unquantized_llama_f32_reads_back_exactly(smollm2_2blocks, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_gguf(str(smollm2_2blocks), tmp_path / "m.gguf", float_type="f32")
    reader = gguf.GGUFReader(out)
    assert kv(reader, "general.architecture") == "llama"
    for key, want in [("llama.block_count", 2), ("llama.embedding_length", 576),
                      ("llama.feed_forward_length", 1536), ("llama.attention.head_count", 9),
                      ("llama.attention.head_count_kv", 3), ("llama.rope.dimension_count", 64),
                      ("llama.context_length", 8192), ("llama.vocab_size", 49152)]:
        assert kv(reader, key) == want, key
    assert kv(reader, "llama.rope.freq_base") == 100000.0
    assert set(types(reader).values()) == {"F32"} and "output.weight" not in types(reader)
    # the tokenizer KV equals the original GGUF's (the bundled model was converted from it),
    # except the pre-tokenizer: transformers' GGUF conversion dropped SmolLM's digit split,
    # so the folder's tokenizer is plain GPT-2 byte-level: llama.cpp's "gpt-2"
    source = gguf.GGUFReader(BUNDLED["smollm2-135m"].locate_gguf())
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id",
                "padding_token_id", "unknown_token_id", "add_bos_token", "model"):
        assert kv(reader, f"tokenizer.ggml.{key}") == kv(source, f"tokenizer.ggml.{key}"), key
    assert kv(reader, "tokenizer.chat_template") == kv(source, "tokenizer.chat_template")
    assert kv(reader, "tokenizer.ggml.pre") == "gpt-2"

    model, tokenizer = read_back(out), read_back_tokenizer(out)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_2blocks, dtype=torch.float32).eval()
    err = rel_err(logits(ref), logits(model))
    print(f"smollm2 f32 GGUF read back by transformers: max rel logit error {err:.1e}")
    assert err <= 1e-5
    text = load_text("austen-pp")[:20000]
    assert tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(smollm2_2blocks)(
        text)["input_ids"]


@pytest.mark.parametrize(
    ("bits", "symmetric", "ggml"), [(8, True, "Q8_0"), (4, True, "Q4_0")]
)
def test_int_group32_converts_losslessly(tiny_model, tmp_path, bits, symmetric, ggml):
    src = build_dir(tiny_model, tmp_path / "q", int_weight(bits, 32, symmetric))
    out = export_gguf(str(src), tmp_path / "m.gguf")
    reader = gguf.GGUFReader(out)
    kinds = types(reader)
    assert kinds["blk.0.attn_q.weight"] == ggml and kinds["blk.1.ffn_down.weight"] == ggml
    assert kinds["token_embd.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    lowbit_model = load_quantized(src)[0]
    layers = quantized_layers(lowbit_model)
    by_name = {t.name: t for t in reader.tensors}
    q_rows = rope_row_order(64, 4)
    for name, gguf_name in [("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"),
                            ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight")]:
        t = by_name[gguf_name]
        decoded = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        want = layers[name].dequantized_weight()
        want = want[q_rows] if "attn_q" in gguf_name else want
        assert torch.equal(decoded, want), name
    # bits per weight of the block linears: 8.5 (Q8_0) or 4.5 (Q4_0) by ggml's layout
    t = by_name["blk.1.ffn_down.weight"]
    assert t.n_bytes * 8 / t.n_elements == {"Q8_0": 8.5, "Q4_0": 4.5}[ggml]
    model = read_back(out)
    embed = lowbit_model.model.embed_tokens.weight  # tied: the output too
    embed.data = embed.data.half().float()  # the F16 token embedding
    assert rel_err(logits(lowbit_model), logits(model)) <= 1e-5


def test_asymmetric_int4_is_q4_1_when_offsets_are_fp16():
    torch.manual_seed(0)
    rows, cols = 8, 64
    grid = IntGrid(4, 32, symmetric=False)
    codes = torch.randint(0, 16, (rows, cols), dtype=torch.uint8)
    scales = 2.0 ** torch.randint(-8, -2, (rows, 2)).float()  # scale * zero exact in fp16
    zeros = torch.randint(0, 16, (rows, 2)).float()
    w = PackedIntWeight.from_codes(codes, scales, zeros, grid)
    ggml_type, raw = int_payload("x", w)
    assert ggml_type == Q.Q4_1
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(raw, Q.Q4_1)), w.dequantize())
    odd = PackedIntWeight.from_codes(codes, scales * 1.1, zeros, grid)
    with pytest.raises(LowbitError, match="not fp16 values"):
        int_payload("x", odd)


def gguf_rows(w: torch.Tensor, ggml_type: str):
    """``w`` rounded onto ``ggml_type``, or the type llama-quantize falls back to for its
    width (K types need inputs in multiples of 256)."""
    return quantize_rows(w, fallback_type(ggml_type, w.shape[1]))


def test_gguf_block_weights_are_copied_byte_for_byte(llama256, tmp_path):
    fmt = {"q_proj": "q4_k", "k_proj": "q5_k", "v_proj": "q6_k", "o_proj": "q4_0",
           "gate_proj": "q5_0", "up_proj": "q4_1", "down_proj": "q8_0"}
    src = build_dir(llama256, tmp_path / "q",
                    {k: functools.partial(gguf_rows, ggml_type=t) for k, t in fmt.items()})
    out = export_gguf(str(src), tmp_path / "m.gguf", float_type="f32")
    reader = gguf.GGUFReader(out)
    kinds = types(reader)
    assert kinds["blk.0.attn_q.weight"] == "Q4_K" and kinds["blk.1.ffn_down.weight"] == "Q8_0"
    assert kv(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    lowbit_model = load_quantized(src)[0]
    by_name = {t.name: t for t in reader.tensors}
    raw_v = quantized_layers(lowbit_model)["model.layers.0.self_attn.v_proj"].stored_weight().raw
    assert np.array_equal(by_name["blk.0.attn_v.weight"].data, raw_v.numpy())
    raw_q = quantized_layers(lowbit_model)["model.layers.0.self_attn.q_proj"].stored_weight().raw
    assert np.array_equal(by_name["blk.0.attn_q.weight"].data,
                          raw_q[rope_row_order(256, 4)].numpy())  # rows moved, bytes kept
    model = read_back(out)
    assert rel_err(logits(lowbit_model), logits(model)) <= 1e-5


def test_refusals_name_the_fix(tiny_model, tmp_path):
    g64 = build_dir(tiny_model, tmp_path / "g64", int_weight(4, 64, True))
    with pytest.raises(LowbitError, match=r"not in blocks of 32.*--dequantize"):
        export_gguf(str(g64), tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
    act = build_dir(tiny_model, tmp_path / "act", int_weight(8, 32, True),
                    act=lambda name: ActQuantizer("int8", "token"))
    with pytest.raises(LowbitError, match="activation quantization"):
        export_gguf(str(act), tmp_path / "b.gguf", dequantize=True)
    (tmp_path / "c.gguf").write_bytes(b"")
    with pytest.raises(LowbitError, match="exists"):
        export_gguf(str(tiny_model), tmp_path / "c.gguf")
    with pytest.raises(LowbitError, match="float-type"):
        export_gguf(str(tiny_model), tmp_path / "d.gguf", float_type="q4_0")


def test_dequantize_writes_f32_with_lowbit_logits(tiny_model, tmp_path):
    src = build_dir(tiny_model, tmp_path / "g64", int_weight(4, 64, False))
    out = export_gguf(str(src), tmp_path / "m.gguf", float_type="f32", dequantize=True)
    assert types(gguf.GGUFReader(out))["blk.0.ffn_up.weight"] == "F32"
    model = read_back(out)
    assert rel_err(logits(load_quantized(src)[0]), logits(model)) <= 1e-5


def test_unsupported_architecture_is_refused(tmp_path, smollm2_2blocks):
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=1, num_attention_heads=4)
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "neox")
    AutoTokenizer.from_pretrained(smollm2_2blocks).save_pretrained(tmp_path / "neox")
    with pytest.raises(LowbitError, match="supported: llama, mistral, qwen2, qwen3, gemma3"):
        export_gguf(str(tmp_path / "neox"), tmp_path / "m.gguf")


@pytest.mark.slow
def test_gemma3_f32_reads_back_exactly(gemma3_2blocks, tmp_path):
    """Gemma-3: norms stored as 1 + w, sliding window, head size 256; its SentencePiece-style
    vocab converted from tokenizer.json (scores from merge ranks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_gguf(str(gemma3_2blocks), tmp_path / "g.gguf", float_type="f32")
    reader = gguf.GGUFReader(out)
    assert kv(reader, "general.architecture") == "gemma3"
    assert kv(reader, "gemma3.attention.sliding_window") == 512
    assert kv(reader, "gemma3.attention.key_length") == 256
    assert kv(reader, "tokenizer.ggml.model") == "llama"
    ref = AutoModelForCausalLM.from_pretrained(gemma3_2blocks, dtype=torch.float32).eval()
    norm = {t.name: t for t in reader.tensors}["blk.0.attn_norm.weight"]
    assert torch.equal(torch.from_numpy(norm.data.copy()),
                       ref.model.layers[0].input_layernorm.weight.detach() + 1)
    model, tokenizer = read_back(out), read_back_tokenizer(out)
    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563, 496, 3175, 236761, 107]])
    err = rel_err(logits(ref, ids), logits(model, ids))
    print(f"gemma3 f32 GGUF read back by transformers: max rel logit error {err:.1e}")
    assert err <= 1e-5
    text = load_text("austen-pp")[:20000]
    assert tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(gemma3_2blocks)(
        text)["input_ids"]


LLAMACPP_PYTHON = Path(os.environ.get("LOWBIT_LLAMACPP_PYTHON",
                                      "/work/venvs/llamacpp/bin/python"))
LLAMACPP_SCRIPT = Path(__file__).parent.parent / "scripts" / "llamacpp_logits.py"


def llamacpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """fp32 ``[len(ids), vocab]`` logits of GGUF ``path`` by llama.cpp (skips the test when
    ``$LOWBIT_LLAMACPP_PYTHON`` cannot import llama_cpp)."""
    if subprocess.run([str(LLAMACPP_PYTHON), "-c", "import llama_cpp"],
                      capture_output=True).returncode if LLAMACPP_PYTHON.exists() else 1:
        pytest.skip(f"{LLAMACPP_PYTHON} has no llama_cpp (the llama.cpp benchmark builds it)")
    (path.parent / "ids.json").write_text(json.dumps(ids))
    subprocess.run([str(LLAMACPP_PYTHON), str(LLAMACPP_SCRIPT), str(path),
                    str(path.parent / "ids.json"), str(path.parent / "logits.npy")], check=True)
    return torch.from_numpy(np.load(path.parent / "logits.npy"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["f32", "q8_0", "q4_0", "q4_k"])
def test_llamacpp_logits_match_lowbit(smollm2_2blocks, tmp_path, kind):
    """llama.cpp runs the exported SmolLM2 (2 blocks) on 64 tokens of real text with lowbit's
    logits. Its CPU matmuls quantize activations to 8 bits for block-type weights, so those
    agree to its rounding, F32 to float summation order (max rel. errors printed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "f32":
        src, model = smollm2_2blocks, AutoModelForCausalLM.from_pretrained(
            smollm2_2blocks, dtype=torch.float32).eval()
    else:
        weight = (functools.partial(gguf_rows, ggml_type=kind) if kind == "q4_k" else
                  int_weight({"q8_0": 8, "q4_0": 4}[kind], 32, True))
        src = build_dir(smollm2_2blocks, tmp_path / "q", weight)
        model = load_quantized(src)[0]
    out = export_gguf(str(src), tmp_path / "m.gguf", float_type="f32", dequantize=True)
    ids = AutoTokenizer.from_pretrained(smollm2_2blocks)(load_text("austen-pp")[:2000])[
        "input_ids"][:64]
    ours = logits(model, torch.tensor([ids]))[0]
    theirs = llamacpp_logits(out, ids)
    err = rel_err(ours, theirs)
    agree = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
    print(f"llama.cpp vs lowbit, {kind}: max rel logit error {err:.2e}, top-1 agreement "
          f"{agree:.3f}")
    # measured here: f32 1.8e-4 (llama.cpp keeps its KV cache in f16), q8_0 7.3e-3, q4_0
    # 7.4e-3, q4_k 1.1e-2; top-1 1.000, 0.984, 1.000, 0.953 (61 of 64 tokens)
    assert err <= (1e-3 if kind == "f32" else 5e-2) and agree >= 0.9


def test_cli_writes_gguf_and_refuses_in_one_line(tiny_model, tmp_path, capsys):
    from lowbit.cli.main import main

    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_model), "--format", "gguf", "--gguf-float-type", "bf16",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"-> {out} (gguf: " in printed and "BF16" in printed
    assert types(gguf.GGUFReader(out))["token_embd.weight"] == "BF16"
    g64 = build_dir(tiny_model, tmp_path / "g64", int_weight(8, 64, True))
    assert main(["export", str(g64), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error: layer model.layers.0.") and "\n" not in err
    assert main(["export", str(g64), "--format", "gptq", "--dequantize",
                 "--out", str(tmp_path / "gptq")]) == 2


def exported_blocks(src: Path, tmp_path: Path, fmt: dict[str, str]):
    """(lowbit model, GGUF path, its reader) of HF folder ``src`` with the linears of each name
    suffix rounded onto ``fmt[suffix]`` (or its fallback), exported with F32 floats."""
    rows = {k: functools.partial(gguf_rows, ggml_type=t) for k, t in fmt.items()}
    out = export_gguf(str(build_dir(src, tmp_path / "q", rows)), tmp_path / "m.gguf",
                      float_type="f32")
    return load_quantized(tmp_path / "q")[0], out, gguf.GGUFReader(out)


def test_q3_k_and_q2_k_blocks_export_byte_for_byte(llama256, tmp_path):
    """q3_k/q2_k weights go into the GGUF as tensor types Q3_K/Q2_K with lowbit's bytes;
    gguf-py decodes them to lowbit's values and transformers' GGUF loader reproduces lowbit's
    logits."""
    suffixes = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    fmt = dict(zip(suffixes, ("q3_k", "q2_k") * 3 + ("q2_k",), strict=True))
    lowbit_model, out, reader = exported_blocks(llama256, tmp_path, fmt)
    assert kv(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q2_K)  # 4 of 7
    layers = quantized_layers(lowbit_model)
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, name, kind in (("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj",
                                   "Q3_K"),
                                  ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj",
                                   "Q2_K")):
        stored, tensor = layers[name].stored_weight(), tensors[gguf_name]
        assert tensor.tensor_type.name == kind
        assert np.array_equal(tensor.data, stored.raw.numpy())
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        assert torch.equal(torch.from_numpy(values), stored.dequantize())
    assert rel_err(logits(lowbit_model), logits(read_back(out))) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["q3_k", "q2_k", "q4_1", "q5_0", "q5_1", "q5_k", "q6_k"])
def test_llamacpp_runs_block_types_like_lowbit(smollm2_2blocks, tmp_path, kind):
    """llama.cpp loads and runs SmolLM2 (2 blocks) exported with each remaining ggml block type
    (K types on down_proj; the 576-wide linears fall back as llama-quantize does) with lowbit's
    logits, to the rounding of its 8-bit activations (max rel. error and top-1 printed)."""
    from transformers import AutoTokenizer

    src = build_dir(smollm2_2blocks, tmp_path / "q", functools.partial(gguf_rows,
                                                                       ggml_type=kind))
    out = export_gguf(str(src), tmp_path / "m.gguf", float_type="f32")
    assert types(gguf.GGUFReader(out))["blk.1.ffn_down.weight"] == kind.upper()
    text_ids = AutoTokenizer.from_pretrained(smollm2_2blocks)(load_text("austen-pp")[:2000])
    ids = text_ids["input_ids"][:64]
    ours = logits(load_quantized(src)[0], torch.tensor([ids]))[0]
    theirs = llamacpp_logits(out, ids)
    err, agree = rel_err(ours, theirs), float((ours.argmax(-1) == theirs.argmax(-1)).float()
                                               .mean())
    print(f"llama.cpp vs lowbit, {kind}: max rel logit error {err:.2e}, top-1 {agree:.3f}")
    # measured here: q3_k 1.43e-2, q2_k 1.33e-2; top-1 0.984, 1.000; q4_1, q5_0, q5_1, q5_k,
    # q6_k: 8.5e-3, 6.7e-3, 6.7e-3, 1.3e-2, 1.1e-2; top-1 0.984, 1.000, 0.984, 0.953, 0.969
    assert err <= 5e-2 and agree >= 0.9
