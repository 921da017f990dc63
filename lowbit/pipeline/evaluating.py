"""Evaluating a loaded model: perplexity on corpora and KL divergence to its base model."""

from __future__ import annotations

import time
from typing import Any

import torch

from lowbit.data.corpora import load_text
from lowbit.errors import LowbitError
from lowbit.eval.kld import kl_divergence
from lowbit.eval.perplexity import perplexity
from lowbit.eval.windows import eval_windows
from lowbit.loading import LoadedModel, load_model
from lowbit.pipeline.configs import as_device


def evaluate(
    loaded: LoadedModel,
    ppl: list[str] = ("austen-pp",),
    kld: bool = False,
    base: LoadedModel | None = None,
    seqlen: int = 512,
    max_tokens: int | None = None,
    kld_corpus: str | None = None,
    progress: bool = True,
    device: str | torch.device | None = "auto",
) -> dict[str, Any]:
    """Perplexity on each corpus and, with ``kld``, KL(base || model) on the first corpus.

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``): both models run there (moved whole).

    Returns ``{"ppl": {corpus: value}, "kld": value | None, "top1_agreement": ..., ...}``.
    """
    if loaded.stream is not None:
        raise LowbitError(
            "a streamed model keeps its blocks on disk and cannot be run; save it "
            "(save_quantized) and evaluate the saved folder"
        )
    device = as_device(device)
    loaded.model.to(device)
    start = time.perf_counter()
    out: dict[str, Any] = {"ppl": {}, "eval_tokens": {}, "kld": None}
    add_bos = loaded.add_bos
    kld_corpus = (kld_corpus or (ppl[0] if ppl else "austen-pp")) if kld else None
    if kld:
        if base is None:
            base = load_model(loaded.source, loaded.dtype)  # the reference in the same dtype
        base.model.to(device)
        windows = eval_windows(loaded.tokenizer, load_text(kld_corpus), seqlen, max_tokens, add_bos)
        result = kl_divergence(base.model, loaded.model, windows, progress=progress)
        out.update(kld=result.kld_mean, kld_corpus=kld_corpus, top1_agreement=result.top1_agreement)
    for corpus in ppl:
        if corpus == kld_corpus:  # same windows, same logits: reuse the KLD pass
            out["ppl"][corpus], out["eval_tokens"][corpus] = result.model_ppl, result.tokens
            continue
        windows = eval_windows(loaded.tokenizer, load_text(corpus), seqlen, max_tokens, add_bos)
        scored = perplexity(loaded.model, windows, progress=progress)
        out["ppl"][corpus], out["eval_tokens"][corpus] = scored.ppl, scored.tokens
    out["seconds"] = time.perf_counter() - start
    return out
