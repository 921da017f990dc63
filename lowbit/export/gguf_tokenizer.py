"""GGUF tokenizer metadata from a Hugging Face ``tokenizer.json``.

Two kinds of BPE tokenizer are converted, each to the llama.cpp tokenizer that computes the
same tokens:

- byte-level BPE (GPT-2 style: ``ByteLevel`` pre-tokenizer) -> ``tokenizer.ggml.model =
  "gpt2"`` with ``tokens``, ``token_type`` and ``merges`` (``"a b"`` in rank order), and
  ``tokenizer.ggml.pre`` naming llama.cpp's pre-tokenizer regex, recognised from the
  tokenizer's own split rules (:data:`PRE_TOKENIZERS`);
- SentencePiece-style BPE (``byte_fallback``, spaces replaced by ``▁``: Gemma, Llama-2) ->
  ``"llama"`` with ``tokens``, ``scores`` and ``token_type``. llama.cpp merges the adjacent
  pair whose joined token has the highest score, Hugging Face the pair of lowest merge rank,
  so a token's score is minus the rank of the first merge producing it; tokens no merge
  produces score below every merge.

Token types: special added tokens CONTROL, other added tokens USER_DEFINED, ``<0xNN>`` byte
tokens (SentencePiece) BYTE, ids past the tokenizer's vocabulary up to the model's
``[PAD<id>]`` UNUSED. Special ids, ``add_bos_token`` and the chat template come from the folder
(gguf's ``SpecialVocab``); ``add_bos_token`` is what the tokenizer does when encoding.
Anything else is refused with a LowbitError naming what is supported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf

from lowbit.data.tokens import tokenizer_adds_bos
from lowbit.errors import LowbitError

SUPPORTED = ("byte-level BPE (GPT-2/Llama-3/Qwen2/SmolLM style tokenizer.json) and "
             "SentencePiece-style BPE with byte fallback (Gemma/Llama-2 tokenizer.json)")

# The split regexes of known byte-level BPE tokenizers -> llama.cpp's pre-tokenizer name.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
              r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}"
             r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("bytelevel-regex",): "gpt-2",
    ("digits", "bytelevel-regex"): "smollm",
    ("split:" + _LLAMA3_RE, "bytelevel"): "llama-bpe",
    ("split:" + _QWEN2_RE, "bytelevel"): "qwen2",
    ("split:" + _GPT2_RE, "bytelevel"): "gpt-2",
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _refuse(what: str) -> LowbitError:
    return LowbitError(f"GGUF export: the tokenizer is {what}; supported: {SUPPORTED}")


def _pre_steps(pre: dict | None) -> tuple[str, ...]:
    """A pre-tokenizer as a tuple of step descriptions (what :data:`PRE_TOKENIZERS` keys)."""
    if pre is None:
        return ()
    if pre["type"] == "Sequence":
        return tuple(s for p in pre["pretokenizers"] for s in _pre_steps(p))
    if pre["type"] == "ByteLevel":
        if pre.get("add_prefix_space"):
            return ("bytelevel-prefix-space",)
        return ("bytelevel-regex" if pre.get("use_regex", True) else "bytelevel",)
    if pre["type"] == "Digits" and pre.get("individual_digits"):
        return ("digits",)
    if pre["type"] == "Split" and pre.get("behavior") == "Isolated":
        pattern = pre["pattern"]
        return ("split:" + pattern.get("Regex", pattern.get("String", "")),)
    return (pre["type"],)


def _ordered_vocab(tj: dict, n_vocab: int) -> list[str]:
    """Token strings by id, ``[PAD<id>]`` for ids the tokenizer lacks (below ``n_vocab``)."""
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    by_id.update({a["id"]: a["content"] for a in tj.get("added_tokens", [])})
    if by_id and max(by_id) >= n_vocab:
        raise _refuse(f"larger ({max(by_id) + 1} ids) than the model's vocabulary ({n_vocab})")
    return [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]


def _merges(tj: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
            for m in tj["model"].get("merges", [])]


def _types(tj: dict, tokens: list[str], byte_tokens: bool) -> list[int]:
    added = {a["id"]: a["special"] for a in tj.get("added_tokens", [])}
    known = set(tj["model"]["vocab"].values()) | set(added)
    out = []
    for i, tok in enumerate(tokens):
        if i in added:
            kind = gguf.TokenType.CONTROL if added[i] else gguf.TokenType.USER_DEFINED
        elif i not in known:
            kind = gguf.TokenType.UNUSED
        elif byte_tokens and _BYTE_TOKEN.fullmatch(tok):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        out.append(int(kind))
    return out


def _spm_scores(tj: dict, tokens: list[str], types: list[int]) -> list[float]:
    """Scores for llama.cpp's SentencePiece merge order (module docstring)."""
    first_rank: dict[str, int] = {}
    merges = _merges(tj)
    for rank, (a, b) in enumerate(merges):
        first_rank.setdefault(a + b, rank)
    scores = []
    for i, tok in enumerate(tokens):
        if types[i] in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            scores.append(-1000.0)
        elif types[i] == gguf.TokenType.NORMAL:
            scores.append(-float(first_rank.get(tok, len(merges) + i)))
        else:
            scores.append(0.0)
    return scores


def _pre_text(tj: dict) -> str:
    """The normalizer and pre-tokenizer as JSON text (non-ASCII kept)."""
    return json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")], ensure_ascii=False)


def _is_spm(tj: dict) -> bool:
    norm = _pre_text(tj)
    return bool(tj["model"].get("byte_fallback")) and "\u2581" in norm


def _add_space_prefix(tj: dict) -> bool:
    """Whether the normalizer prepends ``▁`` (or a Metaspace pre-tokenizer does)."""
    text = _pre_text(tj)
    return '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in
                                   text)


def _adds_eos(tokenizer: Any) -> bool:
    """Whether the tokenizer appends EOS when encoding with special tokens."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return eos is not None and len(ids) > 1 and int(ids[-1]) == int(eos)


def write_tokenizer(w: gguf.GGUFWriter, folder: Path, tokenizer: Any, n_vocab: int) -> str:
    """Add the tokenizer keys of HF folder ``folder`` (whose loaded tokenizer is ``tokenizer``)
    for a model of ``n_vocab`` embedding rows; returns ``tokenizer.ggml.model``."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise _refuse(f"not a tokenizer.json in {folder}")
    tj = json.loads(file.read_text(encoding="utf-8"))
    if tj["model"]["type"] != "BPE":
        raise _refuse(f"a {tj['model']['type']} model")
    tokens = _ordered_vocab(tj, n_vocab)
    if _is_spm(tj):
        types = _types(tj, tokens, byte_tokens=True)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(_spm_scores(tj, tokens, types))
        w.add_token_types(types)
        w.add_add_space_prefix(_add_space_prefix(tj))
        model = "llama"
    else:
        steps = _pre_steps(tj.get("pre_tokenizer"))
        pre = PRE_TOKENIZERS.get(steps)
        if pre is None or (tj.get("decoder") or {}).get("type") != "ByteLevel":
            raise _refuse(f"a BPE with pre-tokenizer steps {list(steps)} that no llama.cpp "
                          "pre-tokenizer is known to match")
        if not tj["model"].get("merges"):
            raise _refuse("a byte-level BPE without merges (llama.cpp's gpt2 tokenizer needs "
                          "tokenizer.ggml.merges, and gguf writes no empty array)")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(_types(tj, tokens, byte_tokens=False))
        w.add_token_merges([f"{a} {b}" for a, b in _merges(tj)])
        model = "gpt2"
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=n_vocab)
    special.add_special_token["bos"] = tokenizer_adds_bos(tokenizer)
    special.add_special_token["eos"] = _adds_eos(tokenizer)
    special.add_to_gguf(w, quiet=True)
    return model
