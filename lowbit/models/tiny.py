"""Tiny random-weight models of any transformers architecture, for tests and the architecture
matrix (docs/ARCHITECTURES.md): two blocks, hidden 64, a 512-word vocabulary and a byte-level
tokenizer, saved as a plain Hugging Face folder. Nothing is downloaded.

Random weights are enough to check structure (which modules are linears, what feeds what),
saving, reloading and kernels; they say nothing about accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 512
BOS, EOS = 256, 257

# Sizes every architecture takes; per-architecture keys below adjust the rest.
COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "pad_token_id": None,
}
EXTRA: dict[str, dict[str, Any]] = {
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "falcon": {"new_decoder_architecture": False, "multi_query": True},
}


def tiny_config(model_type: str, **overrides: Any):
    """A transformers config of ``model_type`` at the tiny sizes (``overrides`` win)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**COMMON, **EXTRA.get(model_type, {}), **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random-initialised ``*ForCausalLM`` of ``model_type`` (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()


def save_tiny(model_type: str, folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny ``model_type`` model and the byte-level tokenizer to ``folder``."""
    folder = Path(folder)
    tiny_model(model_type, seed, **overrides).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: ids 0-255 are the bytes (GPT-2's
    byte-to-unicode map), 256 ``<s>`` (added first when encoding), 257 ``</s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab["<s>"], vocab["</s>"] = BOS, EOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level map: each byte to a printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(161, 173), *range(174, 256)]
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}
