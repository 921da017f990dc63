"""Perplexity, the way the quantization papers compute it.

Protocol (GPTQ, SpQR, QLLM, ZeroQuant-FP, LR-QAT): tokenize the test text once, cut it into
non-overlapping windows of ``seqlen`` tokens (``eval_windows``), run each window with no cache,
average the next-token negative log-likelihood over every predicted position and exponentiate.
Position 0 of a window is never a target (it has no context; with ``add_bos`` it is the BOS).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit.data.corpora import load_text
from lowbit.data.tokens import tokenizer_adds_bos
from lowbit.eval._forward import (
    batches,
    check_windows,
    chunk_rows,
    eval_mode,
    forward_logits,
)
from lowbit.eval.windows import eval_windows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll_mean)``; ``nll_mean`` in nats per token over ``tokens`` predicted tokens
    (``windows * (seqlen - 1)``); ``seconds`` is the wall time of the forward passes."""

    ppl: float
    nll_mean: float
    tokens: int
    windows: int
    seconds: float = 0.0


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL ``-log softmax(logits)[target]``.

    ``logits``: ``[..., V]`` any float dtype; ``targets``: int64 of the same leading shape.
    Returns float32 of the leading shape. The log-softmax is done in fp32, a bounded number of
    positions at a time, so a 262k vocabulary never needs a second full-size fp32 copy.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    flat_targets = targets.reshape(-1).to(flat.device)
    step = chunk_rows(vocab)
    parts = [
        F.cross_entropy(flat[i : i + step].float(), flat_targets[i : i + step], reduction="none")
        for i in range(0, flat.shape[0], step)
    ]
    return torch.cat(parts).reshape(targets.shape)


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "ppl",
) -> PerplexityResult:
    """Perplexity of causal LM ``model`` on ``windows`` (``[n_windows, seqlen]`` int64).

    Every window is scored independently (no state carried across windows); targets are
    ``windows[:, 1:]``, predicted from ``logits[:, :-1]``. NLLs are computed in fp32 and summed
    in float64. Runs under ``torch.inference_mode`` with ``model.eval()`` and ``use_cache=False``
    (the model's train/eval flag is restored afterwards). ``desc`` labels the tqdm bar (e.g.
    ``"ppl austen-pp"``); ``progress=False`` hides it.
    """
    check_windows(windows, batch_size)
    n_windows, seqlen = windows.shape
    total = torch.zeros((), dtype=torch.float64)
    start = time.perf_counter()
    bar = tqdm(total=n_windows, desc=desc, unit="win", disable=not progress, leave=False)
    try:
        with eval_mode(model):
            done = 0
            for batch in batches(windows, batch_size):
                logits = forward_logits(model, batch)
                nll = token_nll(logits[:, :-1], batch[:, 1:])
                total += nll.sum(dtype=torch.float64).cpu()
                done += batch.shape[0]
                bar.update(batch.shape[0])
                bar.set_postfix(ppl=f"{math.exp(total.item() / (done * (seqlen - 1))):.3f}")
    finally:
        bar.close()
    tokens = n_windows * (seqlen - 1)
    nll_mean = total.item() / tokens
    seconds = time.perf_counter() - start
    log.info(
        "%s: ppl %.4f over %d tokens (%d windows, %.1f s)",
        desc,
        math.exp(nll_mean),
        tokens,
        n_windows,
        seconds,
    )
    return PerplexityResult(math.exp(nll_mean), nll_mean, tokens, n_windows, seconds)


def corpus_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    corpus: str,
    seqlen: int = 512,
    max_tokens: int | None = None,
    add_bos: bool | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """``perplexity`` of ``model`` on corpus spec ``corpus`` (see ``lowbit.data.load_text``).

    ``add_bos=None`` uses BOS exactly when the tokenizer adds it itself (Gemma: yes, SmolLM2:
    no; see ``tokenizer_adds_bos``).
    """
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    windows = eval_windows(tokenizer, load_text(corpus), seqlen, max_tokens, add_bos)
    return perplexity(model, windows, batch_size, progress, desc=f"ppl {corpus}")
