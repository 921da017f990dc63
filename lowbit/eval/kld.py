"""KL divergence of a (quantized) model's next-token distributions from its base model's.

Perplexity on a small model moves little and noisily at 4 bits and explodes at 3 bits; the
token-level KL divergence KL(P_base || P_model), averaged over the same evaluation windows, is a
finer and more stable yardstick (as llama.cpp's ``--kl-divergence`` reports it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval._forward import (
    batches,
    check_windows,
    chunk_rows,
    eval_mode,
    forward_logits,
)
from lowbit.eval.perplexity import token_nll

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KLDResult:
    """KL(P_base || P_model) in nats per token over ``tokens`` positions.

    ``kld_mean``: mean over positions; ``kld_median``/``kld_p99``/``kld_max``: quantiles of the
    per-position values; ``kld_max_window``: largest per-window mean; ``top1_agreement``: share
    of positions where both models' most likely next token is the same; ``model_ppl``: the
    model's perplexity on the same positions, from the same logits (equal to
    :func:`lowbit.eval.perplexity.perplexity` on these windows, at no extra forward pass).
    """

    kld_mean: float
    kld_median: float
    kld_p99: float
    kld_max: float
    kld_max_window: float
    top1_agreement: float
    tokens: int
    windows: int
    seconds: float = 0.0
    model_ppl: float = float("nan")


def token_kl(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL(softmax(base_logits) || softmax(logits))``.

    Both ``[..., V]`` (any float dtype, same shape). Returns float32 of the leading shape,
    computed in fp32 over bounded chunks of positions (gemma3's vocabulary is 262144). Equal
    inputs give exactly 0.
    """
    vocab = base_logits.shape[-1]
    p_flat = base_logits.reshape(-1, vocab)
    q_flat = logits.reshape(-1, vocab).to(p_flat.device)
    step = chunk_rows(vocab)
    parts = []
    for i in range(0, p_flat.shape[0], step):
        log_p = F.log_softmax(p_flat[i : i + step].float(), dim=-1)
        log_q = F.log_softmax(q_flat[i : i + step].float(), dim=-1)
        parts.append((log_p.exp() * (log_p - log_q)).sum(dim=-1))
    return torch.cat(parts).reshape(base_logits.shape[:-1])


def kl_divergence(
    base_model: torch.nn.Module,
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "kld",
) -> KLDResult:
    """KL divergence of ``model`` from ``base_model`` on ``windows`` (``[n, seqlen]`` int64).

    Scores the same ``seqlen - 1`` positions per window as ``perplexity`` (those that predict a
    token of the window: ``logits[:, :-1]``). Both models run under ``torch.inference_mode``,
    ``eval()`` and ``use_cache=False``; they may sit on different devices. Per-position values
    are fp32, sums float64.
    """
    check_windows(windows, batch_size)
    n_windows, seqlen = windows.shape
    per_token: list[torch.Tensor] = []
    agree = 0
    kl_sum = 0.0
    nll_sum = 0.0
    start = time.perf_counter()
    bar = tqdm(total=n_windows, desc=desc, unit="win", disable=not progress, leave=False)
    try:
        with eval_mode(base_model, model):
            for batch in batches(windows, batch_size):
                base_logits = forward_logits(base_model, batch)[:, :-1]
                logits = forward_logits(model, batch)[:, :-1]
                if base_logits.shape != logits.shape:
                    raise LowbitError(
                        f"models disagree on the output shape {tuple(base_logits.shape)} vs "
                        f"{tuple(logits.shape)}; compare a model with its own base model"
                    )
                logits = logits.to(base_logits.device)
                per_token.append(token_kl(base_logits, logits).cpu())
                nll_sum += token_nll(logits, batch[:, 1:]).sum(dtype=torch.float64).item()
                agree += int((base_logits.argmax(-1) == logits.argmax(-1)).sum().item())
                kl_sum += per_token[-1].sum(dtype=torch.float64).item()
                bar.update(batch.shape[0])
                done = sum(t.numel() for t in per_token)
                bar.set_postfix(kld=f"{kl_sum / done:.5f}")
    finally:
        bar.close()
    kl = torch.cat(per_token)  # [n_windows, seqlen - 1] float32
    result = _summarize(kl, agree, time.perf_counter() - start)
    result = dataclasses.replace(result, model_ppl=math.exp(nll_sum / result.tokens))
    log.info(
        "%s: mean %.5f, p99 %.5f, top-1 agreement %.4f over %d tokens",
        desc,
        result.kld_mean,
        result.kld_p99,
        result.top1_agreement,
        result.tokens,
    )
    return result


def _summarize(kl: torch.Tensor, agree: int, seconds: float) -> KLDResult:
    """Statistics of per-position KL ``kl`` (``[n_windows, positions]`` float32)."""
    flat = kl.reshape(-1).double()
    ordered = torch.sort(flat).values
    n = ordered.numel()
    return KLDResult(
        kld_mean=flat.mean().item(),
        kld_median=ordered[(n - 1) // 2].item(),
        kld_p99=ordered[min(n - 1, int(0.99 * n))].item(),
        kld_max=ordered[-1].item(),
        kld_max_window=kl.double().mean(dim=1).max().item(),
        top1_agreement=agree / n,
        tokens=n,
        windows=kl.shape[0],
        seconds=seconds,
    )
