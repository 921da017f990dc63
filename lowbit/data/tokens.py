"""Tokenize a whole corpus once, with a small in-memory cache.

Both calibration sampling and evaluation windowing start from the same thing: the corpus text
tokenized in one call with no special tokens. Tokenizing Brown (6 MB) takes 3-6 s on 2 cores, so
the result is cached per (tokenizer object, text hash).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch

from lowbit.data.corpora import text_sha256
from lowbit.errors import LowbitError

_CACHE_SIZE = 8
# key -> (tokenizer kept alive so its id() cannot be reused, ids)
_cache: OrderedDict[tuple[int, str], tuple[Any, torch.Tensor]] = OrderedDict()
_lock = threading.Lock()


def tokenize_text(tokenizer: Any, text: str, cache: bool = True) -> torch.Tensor:
    """Token ids of ``text`` as one sequence, no special tokens (no BOS/EOS added).

    ``tokenizer`` is a Hugging Face tokenizer (anything callable as
    ``tokenizer(text, add_special_tokens=False)["input_ids"]``).
    Returns a 1-D ``torch.int64`` tensor ``[n_tokens]``; treat it as read-only (it may be shared
    through the cache).
    """
    if not text:
        raise LowbitError("the corpus text is empty; give a corpus with text in it")
    key = (id(tokenizer), text_sha256(text))
    if cache:
        with _lock:
            hit = _cache.get(key)
            if hit is not None:
                _cache.move_to_end(key)
                return hit[1]
    encoded = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.tensor(encoded, dtype=torch.int64)
    if ids.ndim != 1:
        raise LowbitError("the tokenizer returned a batch for one text; pass a single tokenizer")
    if cache:
        with _lock:
            _cache[key] = (tokenizer, ids)
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    return ids


def clear_token_cache() -> None:
    """Drop every cached tokenization (frees the memory and the tokenizers it kept alive)."""
    with _lock:
        _cache.clear()


def bos_token_id(tokenizer: Any) -> int:
    """The tokenizer's BOS id, or a ``LowbitError`` saying how to do without one."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise LowbitError(
            "add_bos was requested but the tokenizer has no BOS token; evaluate without BOS "
            "(add_bos=False) or set tokenizer.bos_token"
        )
    return int(bos)


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer itself puts BOS first when encoding with special tokens.

    A model whose tokenizer does this (Gemma, Llama-2/3) was trained with BOS at the start of
    every sequence and needs it at the start of every evaluation window; SmolLM2's does not.
    Use it as the default for ``add_bos``.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and int(ids[0]) == int(bos)
