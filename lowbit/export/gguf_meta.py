"""GGUF model metadata: which llama.cpp architecture a transformers config maps to, its
hyper-parameter keys, and the per-architecture tensor conventions.

What llama.cpp reads (key names ``{arch}.…``, the way llama.cpp's ``convert_hf_to_gguf.py``
writes them): ``context_length``, ``embedding_length``, ``block_count``,
``feed_forward_length``, ``attention.head_count`` / ``head_count_kv``,
``attention.layer_norm_rms_epsilon``, ``rope.freq_base``, ``vocab_size``; Llama adds
``rope.dimension_count``; a head size other than ``hidden / heads`` is
``attention.key_length`` / ``value_length``; Gemma-3 adds ``attention.sliding_window`` (its
5-local-1-global layer pattern is fixed in llama.cpp) and writes its local rope base as
``rope.freq_base_swa``.

Tensor conventions (:class:`ArchSpec`): llama.cpp's Llama graph applies rotary embeddings to
interleaved pairs, transformers' to the two halves of each head, so the Llama (and Mistral)
``q_proj`` / ``k_proj`` rows are reordered (:func:`rope_row_order`); Gemma's RMS norms multiply
by ``1 + w`` in transformers and by the stored weight in llama.cpp, so ``+1`` is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import torch

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class ArchSpec:
    """How one transformers ``model_type`` is written.

    Attributes:
        arch: llama.cpp's architecture (``general.architecture``).
        rope_permute: reorder q/k rows from rotate-half to interleaved pairs (Llama graph).
        norm_offset: added to every ``*norm.weight`` (Gemma's ``1 + w`` convention).
    """

    arch: gguf.MODEL_ARCH
    rope_permute: bool = False
    norm_offset: float = 0.0


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(gguf.MODEL_ARCH.LLAMA, rope_permute=True),
    "mistral": ArchSpec(gguf.MODEL_ARCH.LLAMA, rope_permute=True),
    "qwen2": ArchSpec(gguf.MODEL_ARCH.QWEN2),
    "qwen3": ArchSpec(gguf.MODEL_ARCH.QWEN3),
    "gemma3_text": ArchSpec(gguf.MODEL_ARCH.GEMMA3, norm_offset=1.0),
}

# Gemma-3 in llama.cpp: every 6th layer global, the others local with this rope base
GEMMA3_PATTERN = 6


def arch_spec(config: Any) -> ArchSpec:
    """The :class:`ArchSpec` of a transformers config; LowbitError for other architectures."""
    spec = ARCHS.get(config.model_type)
    if spec is None:
        raise LowbitError(
            f"GGUF export does not support model type '{config.model_type}'; supported: "
            f"{', '.join(ARCHS)} (export it to compressed-tensors instead)"
        )
    return spec


def arch_name(spec: ArchSpec) -> str:
    return gguf.MODEL_ARCH_NAMES[spec.arch]


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_row_order(rows: int, n_head: int) -> torch.Tensor:
    """int64 ``[rows]``: GGUF row ``i`` is transformers row ``order[i]`` of a q or k projection
    with ``n_head`` heads. Within a head of size ``d``, transformers pairs dimension ``j`` with
    ``j + d/2`` (rotate-half), llama.cpp pairs ``2j`` with ``2j + 1``; so GGUF row ``2j + t``
    of a head is transformers row ``j + t*d/2``."""
    half = rows // n_head // 2
    return torch.arange(rows).view(n_head, 2, half).transpose(1, 2).reshape(rows)


def _rope(config: Any) -> tuple[dict, dict | None]:
    """(global rope parameters, local/sliding ones or None) from a transformers 5 config
    (``rope_parameters``, per layer type for Gemma-3) or an older one (``rope_theta``)."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        return params["full_attention"], params.get("sliding_attention")
    if not params:
        params = {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
    return params, None


def _check_rope(model_type: str, params: dict) -> None:
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise LowbitError(f"GGUF export of {model_type}: rope scaling '{kind}' is not written; "
                          "supported: default and linear rope")


def write_hparams(w: gguf.GGUFWriter, config: Any, spec: ArchSpec, vocab_size: int) -> None:
    """Add the architecture's hyper-parameter keys of ``config`` to writer ``w``."""
    dim = head_dim(config)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(config.num_attention_heads))
    w.add_head_count_kv(int(getattr(config, "num_key_value_heads", config.num_attention_heads)))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(vocab_size)
    if dim != config.hidden_size // config.num_attention_heads or spec.arch in (
        gguf.MODEL_ARCH.GEMMA3, gguf.MODEL_ARCH.QWEN3
    ):
        w.add_key_length(dim)
        w.add_value_length(dim)
    if spec.arch == gguf.MODEL_ARCH.LLAMA:
        w.add_rope_dimension_count(dim)
    rope, local = _rope(config)
    _check_rope(config.model_type, rope)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if spec.arch == gguf.MODEL_ARCH.GEMMA3:
        _gemma3(w, config, local)


def _gemma3(w: gguf.GGUFWriter, config: Any, local: dict | None) -> None:
    """Gemma-3 keys; LowbitError where the config departs from what llama.cpp hard-codes."""
    types = list(getattr(config, "layer_types", None) or [])
    expected = ["full_attention" if (i + 1) % GEMMA3_PATTERN == 0 else "sliding_attention"
                for i in range(len(types))]
    if types != expected:
        raise LowbitError("GGUF export of gemma3: llama.cpp fixes the layer pattern at 5 "
                          "sliding + 1 global; this config's layer_types differ")
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and scalar != head_dim(config):
        raise LowbitError(f"GGUF export of gemma3: query_pre_attn_scalar {scalar} differs from "
                          f"head_dim {head_dim(config)}, which llama.cpp assumes")
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, cap, None):
            raise LowbitError(f"GGUF export of gemma3: {cap} is set; llama.cpp's gemma3 "
                              "graph has no soft-capping")
    w.add_sliding_window(int(config.sliding_window))
    if local is not None:
        _check_rope(config.model_type, local)
        w.add_rope_freq_base_swa(float(local["rope_theta"]))
