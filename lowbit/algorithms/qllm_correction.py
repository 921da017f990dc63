"""QLLM's efficient error correction (Liu et al. 2023, section 3.2), over a group of blocks.

Every quantized linear of the group gets a low-rank term, ``y = Q(x') (Q(W') + (alpha/r) B A)^T``
(``x'`` the reassembled input, ``Q`` the activation quantizer with a straight-through round), with
``A`` ``[r, C']`` initialised as LoRA does and ``B`` ``[R, r]`` zero; ``A``, ``B`` and the gains of
the norms feeding the linears are trained with AdamW to minimise the MSE between the group's
output and the full-precision group's output on the same inputs. Then ``W' <- W' + (alpha/r) B A``
(the full-precision reassembled weight) is merged and re-quantized.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.algorithms.wa_quant import quantized_linear
from lowbit.core.report import LayerReport
from lowbit.memory import peak_rss_mb, reset_peak_rss
from lowbit.nn.quant_linear import QuantLinear


class CorrectedLinear(nn.Module):
    """A quantized linear with a trainable low-rank correction of its quantized weight.

    Args:
        quant: the installed layer (its reassembly, activation quantizer and bias are used).
        rank, alpha: ``A`` ``[rank, C']``, ``B`` ``[R, rank]``, scale ``alpha / rank``.
        generator: seeds ``A``'s initialisation.
    """

    def __init__(self, quant: QuantLinear, rank: int, alpha: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.quant = quant
        self.register_buffer("w_q", quant.dequantized_weight().clone())
        rows, cols = self.w_q.shape
        bound = 1 / math.sqrt(cols)  # kaiming_uniform(a=sqrt(5)), as LoRA initialises A
        # drawn on the CPU: the same start on any device
        a = (torch.rand(rank, cols, generator=generator) * 2 - 1) * bound
        self.a = nn.Parameter(a.to(self.w_q.device))
        self.b = nn.Parameter(torch.zeros(rows, rank, device=self.w_q.device))
        self.scale = alpha / rank

    def delta(self) -> torch.Tensor:
        """fp32 ``[R, C']`` = ``(alpha / r) B A``."""
        return self.scale * (self.b @ self.a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quant
        if q.reassembly is not None:
            x = q.reassembly(x)
        if q.act_quant is not None:
            x = x + (q.act_quant(x) - x).detach()  # straight-through round
        bias = None if q.bias is None else q.bias.to(x.dtype)
        return F.linear(x, (self.w_q + self.delta()).to(x.dtype), bias)  # the model's dtype


def correct_group(config, group, per_block: list[list[LayerReport]]) -> list[LayerReport]:
    """Train, merge and re-quantize the group's linears in place; their updated reports.

    ``group`` is the engine's :class:`~lowbit.engine.context.GroupContext`; every
    QuantLinear in it carries ``calibration_weight`` (fp32 ``[R, C']``, kept by QLLM's
    ``apply_block``).
    """
    start = time.perf_counter()
    rss_measured = reset_peak_rss()
    generator = torch.Generator().manual_seed(group.blocks[0].index)
    layers = _wrap(config, group, generator)
    params = [p for _ctx, _name, m in layers for p in (m.a, m.b)]
    norms = _norm_gains(group) if config.tune_norms else []
    for block_ctx in group.blocks:
        block_ctx.block.requires_grad_(False)
    for p in params + norms:
        p.requires_grad_(True)
    pairs = _micro_batches(group, config.micro_batch)
    before = _mean_loss(group, pairs)
    optimizer = torch.optim.AdamW(params + norms, lr=config.lr, weight_decay=0.0)
    last_epoch = 0.0
    for _epoch in range(config.epochs):
        last_epoch = 0.0
        for i in torch.randperm(len(pairs), generator=generator).tolist():
            x, y = pairs[i]
            loss = F.mse_loss(group.forward(x), group.on_device(y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last_epoch += float(loss.detach()) / len(pairs)
    for p in norms:
        p.requires_grad_(False)
    _merge(config, layers)
    after = _mean_loss(group, pairs)
    facts = {
        "correction_loss_before": before,
        "correction_loss_last_epoch": last_epoch,  # training forward, before the merge
        "correction_loss_after_merge": after,
        "correction_seconds": time.perf_counter() - start,
        "correction_peak_rss_mb": peak_rss_mb(),
        "correction_peak_rss_scope": "correction only" if rss_measured else "whole process",
        "correction_blocks": [c.index for c in group.blocks],
        "correction_steps": config.epochs * len(pairs),
    }
    out = []
    for block in per_block:
        for report in block:
            report.extra.update(facts)
            out.append(report)
    return out


def _wrap(config, group, generator) -> list[tuple[object, str, CorrectedLinear]]:
    layers = []
    for ctx in group.blocks:
        for name in ctx.table.linear_names:
            quant = ctx.module(name)
            if isinstance(quant, QuantLinear) and quant.calibration_weight is not None:
                wrapper = CorrectedLinear(quant, config.rank, config.alpha, generator)
                ctx.replace(name, wrapper)
                layers.append((ctx, name, wrapper))
    return layers


def _norm_gains(group) -> list[nn.Parameter]:
    """The gains of the norms that feed quantized linears (``table.norm_feeds``)."""
    gains = []
    for ctx in group.blocks:
        for norm, _linears in ctx.table.norm_feeds:
            weight = getattr(ctx.module(norm), "weight", None)
            if isinstance(weight, nn.Parameter):
                gains.append(weight)
    return gains


def _micro_batches(group, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs = []
    for x, y in zip(group.hidden, group.targets, strict=True):
        for s in range(0, x.shape[0], size):
            pairs.append((x[s : s + size], y[s : s + size]))
    return pairs


@torch.no_grad()
def _mean_loss(group, pairs) -> float:
    return sum(
        float(F.mse_loss(group.forward(x), group.on_device(y))) for x, y in pairs
    ) / len(pairs)


@torch.no_grad()
def _merge(config, layers) -> None:
    """``W' + (alpha/r) B A`` re-quantized into a plain QuantLinear (no adapter left)."""
    for ctx, name, wrapper in layers:
        q = wrapper.quant
        merged = q.calibration_weight + wrapper.delta()
        ctx.replace(name, quantized_linear(config, merged, q.bias, q.reassembly))
