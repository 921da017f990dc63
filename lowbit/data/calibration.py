"""Calibration batches: random windows of a tokenized corpus (the GPTQ protocol).

GPTQ, SpQR, QLLM and ZeroQuant-FP all calibrate on ``nsamples`` sequences of ``seqlen`` tokens
cut at random offsets out of one tokenized training text, with a fixed seed. This module does
exactly that, reproducibly, with a private ``torch.Generator`` (global RNG state is untouched).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowbit.data.corpora import load_text, text_sha256
from lowbit.data.tokens import bos_token_id, tokenize_text
from lowbit.errors import LowbitError
from lowbit.memory import available_bytes

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def check_seed(seed: int, name: str = "seed") -> None:
    """LowbitError for a seed torch cannot take (it raises a bare ValueError: overflow)."""
    if not SEED_MIN <= seed <= SEED_MAX:
        raise LowbitError(f"{name} must be between {SEED_MIN} and {SEED_MAX}, got {seed}")


def check_draw(
    nsamples: int, seqlen: int, seed: int, min_seqlen: int = 1, prefix: str = ""
) -> None:
    """LowbitError for window-drawing settings out of range; ``prefix="--"`` names them as the
    command line's flags (which are checked before the model is loaded)."""
    if nsamples < 1:
        raise LowbitError(f"{prefix}nsamples must be at least 1, got {nsamples}")
    if seqlen < min_seqlen:
        raise LowbitError(f"{prefix}seqlen must be at least {min_seqlen}, got {seqlen}")
    check_seed(seed, f"{prefix}seed")


@dataclass(frozen=True)
class CalibrationSet:
    """A calibration batch plus what is needed to record and reproduce it.

    ``input_ids``: ``torch.int64`` ``[nsamples, seqlen]``. ``text_sha256`` hashes the corpus
    text (not the tokens), so it identifies the data independently of the tokenizer.
    """

    input_ids: torch.Tensor
    corpus: str
    text_sha256: str
    nsamples: int
    seqlen: int
    seed: int
    add_bos: bool

    def describe(self) -> dict[str, object]:
        """JSON-ready description (for ``lowbit.json``): everything but the tensor."""
        return {
            "corpus": self.corpus,
            "text_sha256": self.text_sha256,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "add_bos": self.add_bos,
        }


def calibration_batch(
    tokenizer: Any,
    text: str,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    add_bos: bool = False,
) -> torch.Tensor:
    """Sample ``nsamples`` random windows of ``seqlen`` tokens from ``text``.

    Sampling: ``text`` is tokenized once with no special tokens into ``ids`` (``n`` tokens).
    Each window takes ``k = seqlen`` consecutive text tokens (``k = seqlen - 1`` when
    ``add_bos``, the BOS id then being prepended so the row is still ``seqlen`` long). The
    ``nsamples`` start offsets are drawn independently and uniformly from ``0 .. n - k``
    inclusive (with replacement, so windows may overlap) by
    ``torch.randint(..., generator=torch.Generator().manual_seed(seed))``: the same tokenizer,
    text and seed always give the same batch, on any machine.

    Returns ``torch.int64`` ``[nsamples, seqlen]`` on CPU. Raises ``LowbitError`` when the text
    has fewer than ``k`` tokens (the message gives both counts) or arguments are out of range.
    """
    check_draw(nsamples, seqlen, seed, min_seqlen=2 if add_bos else 1)
    _check_fits(nsamples, seqlen)
    ids = tokenize_text(tokenizer, text)
    k = seqlen - 1 if add_bos else seqlen
    n = int(ids.numel())
    if n < k:
        most = n + 1 if add_bos else n
        lower = f"lower --seqlen to at most {most}" if most >= (2 if add_bos else 1) else ""
        raise LowbitError(
            f"calibration text too short: a window of seqlen={seqlen} needs {k} text tokens but "
            f"the text has {n}; use a longer corpus (--calib){' or ' + lower if lower else ''}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - k + 1, (nsamples,), generator=gen)
    rows = ids[starts.unsqueeze(1) + torch.arange(k).unsqueeze(0)]
    if add_bos:
        bos = torch.full((nsamples, 1), bos_token_id(tokenizer), dtype=torch.int64)
        rows = torch.cat([bos, rows], dim=1)
    return rows


def _check_fits(nsamples: int, seqlen: int) -> None:
    """LowbitError when the windows cannot be built in this machine's memory: the int64 batch
    and its index tensor, each ``nsamples x seqlen`` (a run sized by an absurd setting fails
    here at once, not after minutes in the allocator)."""
    need = 2 * nsamples * seqlen * 8
    available = available_bytes()
    if available is not None and need > available:
        raise LowbitError(
            f"{nsamples} windows of {seqlen} tokens need {need / 2**30:.1f} GiB to draw, more "
            f"than the {available / 2**30:.1f} GiB of memory available; draw fewer or shorter "
            "windows (--nsamples, --seqlen; LR-QAT draws --steps x --batch-size windows of "
            "--train-seqlen)"
        )


def calibration_set(
    tokenizer: Any,
    corpus: str,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    add_bos: bool = False,
) -> CalibrationSet:
    """``calibration_batch`` on corpus spec ``corpus`` (see ``load_text``), with provenance."""
    text = load_text(corpus)
    ids = calibration_batch(tokenizer, text, nsamples, seqlen, seed, add_bos)
    return CalibrationSet(ids, corpus, text_sha256(text), nsamples, seqlen, seed, add_bos)
