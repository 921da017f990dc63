"""Export a lowbit DIR, a bundled model or a plain Hugging Face folder to one GGUF file
(llama.cpp), written with the ``gguf`` library.

The file holds ``general.*`` keys, the architecture's hyper-parameters
(:mod:`lowbit.export.gguf_meta`), the tokenizer (:mod:`lowbit.export.gguf_tokenizer`), a
``lowbit.export`` key with the provenance record (JSON) and every tensor under llama.cpp's
name (gguf's ``TensorNameMap``):

- norms, biases and other 1-D tensors: F32 (Gemma norms stored as ``1 + w``);
- float 2-D weights (token embedding, an untied output, linears left in float, every linear
  of an unquantized model): ``float_type`` (F16 by default; F32, BF16 or Q8_0);
- quantized linears: :func:`~lowbit.export.gguf_payload.linear_payload` (GGUF block bytes
  as stored, exact Q8_0/Q4_0/Q4_1 conversions, or refused / dequantized to F32);
- Llama/Mistral q and k projections with their rows in llama.cpp's rope order.

The file is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import torch
from torch import nn

from lowbit.atomic import atomic_file
from lowbit.errors import LowbitError
from lowbit.export import gguf_meta, gguf_payload, gguf_tokenizer
from lowbit.export.lowbit_format import is_lowbit_dir, load_quantized, quantized_layers
from lowbit.export.provenance import provenance
from lowbit.models.bundled import BUNDLED, prepare
from lowbit.nn.quant_linear import QuantLinear

TARGET = "gguf"
Q = gguf.GGMLQuantizationType
_FILE_TYPES = {
    Q.F32: "ALL_F32", Q.F16: "MOSTLY_F16", Q.BF16: "MOSTLY_BF16", Q.Q8_0: "MOSTLY_Q8_0",
    Q.Q4_0: "MOSTLY_Q4_0", Q.Q4_1: "MOSTLY_Q4_1", Q.Q5_0: "MOSTLY_Q5_0", Q.Q5_1: "MOSTLY_Q5_1",
    Q.Q2_K: "MOSTLY_Q2_K", Q.Q3_K: "MOSTLY_Q3_K_M", Q.Q4_K: "MOSTLY_Q4_K_M",
    Q.Q5_K: "MOSTLY_Q5_K_M", Q.Q6_K: "MOSTLY_Q6_K",
}
_ROPE_ROWS = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}


def _source(src: str) -> tuple[Path, nn.Module, Any, dict]:
    """(folder, model, tokenizer, manifest) of a lowbit DIR, bundled name or HF folder
    (manifest ``{}`` for an unquantized model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = prepare(src) if src in BUNDLED else Path(src)
    if is_lowbit_dir(folder):
        model, tokenizer, manifest = load_quantized(folder)
        return folder, model, tokenizer, manifest
    if not (folder / "config.json").is_file():
        raise LowbitError(f"unknown model or path '{src}'; use a lowbit DIR, a bundled model "
                          f"({', '.join(BUNDLED)}) or a Hugging Face folder with config.json")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, AutoTokenizer.from_pretrained(folder), {}


def _check_out(out: Path, folder: Path) -> None:
    if out.exists():
        raise LowbitError(f"--out {out} exists; choose a new file name or remove it")
    if out.resolve().parent == folder.resolve():
        raise LowbitError(f"--out {out} is inside the source folder; write it elsewhere")


def _float_state(model: nn.Module, quantized: dict[str, QuantLinear]) -> dict[str, torch.Tensor]:
    """Every float tensor of the model by HF name: non-quantized parameters and persistent
    buffers, quantized layers' biases; no tied output (llama.cpp reuses token_embd)."""
    prefixes = tuple(f"{n}." for n in quantized)
    biases = {f"{n}.bias" for n in quantized}
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(prefixes) or k in biases}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def _payloads(
    model: nn.Module, spec: gguf_meta.ArchSpec, float_type: Q, dequantize: bool
) -> dict[str, gguf_payload.Payload]:
    """Every tensor's payload, by GGUF name, in the model's order."""
    config = model.config
    names = gguf.get_tensor_name_map(spec.arch, config.num_hidden_layers)
    quantized = quantized_layers(model)
    out: dict[str, gguf_payload.Payload] = {}
    items: list[tuple[str, Any]] = list(_float_state(model, quantized).items())
    items += [(f"{n}.weight", q) for n, q in quantized.items()]
    for key, value in items:
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise LowbitError(f"tensor {key} has no llama.cpp name for {config.model_type}; "
                              "GGUF export cannot place it")
        if isinstance(value, QuantLinear):
            payload = gguf_payload.linear_payload(key[: -len(".weight")], value, dequantize)
        elif value.ndim == 1:
            offset = spec.norm_offset if key.endswith("norm.weight") else 0.0
            payload = gguf_payload.float_payload(value.float() + offset, Q.F32)
        else:
            payload = gguf_payload.float_payload(value, float_type)
        proj = key.rsplit(".", 2)[-2]
        if spec.rope_permute and proj in _ROPE_ROWS:
            rows = gguf_payload.logical_shape(payload)[0]
            heads = getattr(config, _ROPE_ROWS[proj], None) or config.num_attention_heads
            payload = gguf_payload.permute_rows(payload, gguf_meta.rope_row_order(rows, heads))
        out[target] = payload
    return out


def _file_type(payloads: dict[str, gguf_payload.Payload]) -> int:
    """``general.file_type``: the most common type of the blocks' 2-D weights."""
    kinds = Counter(t for name, (t, a) in payloads.items()
                    if name.startswith("blk.") and len(gguf_payload.logical_shape((t, a))) == 2)
    common = kinds.most_common(1)[0][0] if kinds else Q.F32
    return int(gguf.LlamaFileType[_FILE_TYPES.get(common, "GUESSED")])


def export_gguf(
    src: str | Path, out: str | Path, float_type: str = "f16", dequantize: bool = False
) -> Path:
    """Write ``src`` (lowbit DIR, bundled name or HF folder) as GGUF file ``out``.

    Args:
        float_type: ggml type of float 2-D weights: ``f16`` | ``f32`` | ``bf16`` | ``q8_0``.
        dequantize: write quantized layers with no exact ggml form as F32 instead of refusing.
    Raises LowbitError (nothing written) for an unsupported architecture, tokenizer or layer.
    """
    if float_type not in gguf_payload.FLOAT_TYPES:
        raise LowbitError(f"--gguf-float-type {float_type}: choose one of "
                          f"{', '.join(gguf_payload.FLOAT_TYPES)}")
    folder, model, tokenizer, manifest = _source(str(src))
    out = Path(out)
    _check_out(out, folder)
    spec = gguf_meta.arch_spec(model.config)
    payloads = _payloads(model, spec, gguf_payload.FLOAT_TYPES[float_type], dequantize)
    n_vocab = int(model.get_input_embeddings().weight.shape[0])
    record = provenance(folder, manifest, TARGET)
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(tmp, gguf_meta.arch_name(spec))
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(Path(str(manifest.get("source_model") or folder)).name)
        w.add_file_type(_file_type(payloads))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string("lowbit.export", json.dumps(record, sort_keys=True))
        gguf_meta.write_hparams(w, model.config, spec, n_vocab)
        gguf_tokenizer.write_tokenizer(w, folder, tokenizer, n_vocab)
        for name, (ggml_type, array) in payloads.items():
            w.add_tensor(name, array, raw_dtype=None if ggml_type in (Q.F32, Q.F16) else
                         ggml_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def summary(path: str | Path) -> str:
    """One line: tensor count by ggml type and the file's size."""
    reader = gguf.GGUFReader(path)
    kinds = Counter(t.tensor_type.name for t in reader.tensors)
    size = Path(path).stat().st_size
    return f"{sum(kinds.values())} tensors ({', '.join(f'{n} {k}' for k, n in kinds.items())})" \
           f", {size / 2**20:.1f} MiB"
