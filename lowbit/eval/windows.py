"""Evaluation windows: the paper perplexity protocol's cut of a tokenized test text."""

from __future__ import annotations

from typing import Any

import torch

from lowbit.data.tokens import bos_token_id, tokenize_text
from lowbit.errors import LowbitError


def check_eval_window(
    seqlen: int, max_tokens: int | None, names: tuple[str, str] = ("seqlen", "max_tokens")
) -> None:
    """LowbitError for an evaluation window or token cap out of range, the two settings
    called ``names`` (the command line passes its flags)."""
    if seqlen < 2:
        raise LowbitError(f"{names[0]} must be at least 2 to predict any token, got {seqlen}")
    if max_tokens is not None and max_tokens < 1:
        raise LowbitError(f"{names[1]} must be at least 1, got {max_tokens}")


def eval_windows(
    tokenizer: Any,
    text: str,
    seqlen: int,
    max_tokens: int | None = None,
    add_bos: bool = False,
) -> torch.Tensor:
    """Cut ``text`` into non-overlapping windows of ``seqlen`` tokens (GPTQ/SpQR protocol).

    The whole text is tokenized once with no special tokens (``ids``, ``n`` tokens). If
    ``max_tokens`` is given only ``ids[:max_tokens]`` is used. Each window holds
    ``k = seqlen`` consecutive text tokens, or with ``add_bos`` the BOS id followed by
    ``k = seqlen - 1`` text tokens, so consecutive windows still tile the text with no overlap
    and no gap: row ``i`` covers text tokens ``[i*k, (i+1)*k)``. The trailing partial window
    (fewer than ``k`` tokens) is dropped.

    Returns ``torch.int64`` ``[n_windows, seqlen]`` on CPU with ``n_windows = min(n,
    max_tokens) // k``. Raises ``LowbitError`` when not even one full window fits.
    """
    check_eval_window(seqlen, max_tokens)
    ids = tokenize_text(tokenizer, text)
    available = int(ids.numel())
    if max_tokens is not None:
        ids = ids[:max_tokens]
    k = seqlen - 1 if add_bos else seqlen
    n_windows = int(ids.numel()) // k
    if n_windows == 0:
        cap = f" (capped by max_tokens={max_tokens})" if max_tokens is not None else ""
        raise LowbitError(
            f"evaluation text too short: one window of seqlen={seqlen} needs {k} text tokens but "
            f"{int(ids.numel())} are usable{cap}, of {available} in the text; use a longer "
            "corpus, a larger --max-tokens or a smaller --seqlen"
        )
    rows = ids[: n_windows * k].reshape(n_windows, k)
    if add_bos:
        bos = torch.full((n_windows, 1), bos_token_id(tokenizer), dtype=torch.int64)
        rows = torch.cat([bos, rows], dim=1)
    return rows.contiguous()
