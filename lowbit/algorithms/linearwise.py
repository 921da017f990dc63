"""The loop shared by weight-only methods that solve one linear at a time from its Hessian."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from lowbit.algorithms.weight_config import IntWeightConfig
from lowbit.core.report import LayerReport
from lowbit.core.threads import threads_for, torch_threads
from lowbit.errors import LowbitError
from lowbit.formats.codecs import StoredWeight
from lowbit.nn.quant_linear import QuantLinear


@dataclass
class Solution:
    """A solver's answer for one linear: the stored weight and solver-specific metrics."""

    stored: StoredWeight
    extra: dict[str, Any] = field(default_factory=dict)


def weight_error(weight: torch.Tensor, quantized: torch.Tensor) -> float:
    """||W - Q||_F / ||W||_F for W, Q ``[R, C]``."""
    w = weight.detach().float()
    return float((w - quantized).norm() / w.norm().clamp(min=1e-30))


def relative_errors(
    weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor
) -> tuple[float, float]:
    """(||E||_F / ||W||_F, tr(E H E^T) / tr(W H W^T)) for W, Q ``[R, C]``, H ``[C, C]``."""
    w = weight.detach().float()
    e = w - quantized
    h = hessian.float()
    weight_err = float(e.norm() / w.norm().clamp(min=1e-30))  # weight_error, from e
    out_err = float(((e @ h) * e).sum() / ((w @ h) * w).sum().clamp(min=1e-30))
    return weight_err, out_err


@contextmanager
def naming_layer(full_name: str) -> Iterator[None]:
    """Prefix a LowbitError raised while solving one linear with the linear's name."""
    try:
        yield
    except LowbitError as exc:
        raise LowbitError(f"layer {full_name}: {exc}") from exc


def quantize_linearwise(
    ctx,
    config: IntWeightConfig,
    solve: Callable[[Any, torch.Tensor, torch.Tensor], Solution],
    true_sequential: bool,
    calibrated: bool = True,
) -> list[LayerReport]:
    """Quantize the block's linears group by group (or all from one pass) with ``solve``.

    With ``true_sequential`` each group's Hessians are collected after the groups before it are
    quantized, so every linear is fitted to the inputs it will see at inference. Without
    ``calibrated`` no Hessian is collected: ``solve`` gets ``None`` for it and the reports'
    ``hessian_rel_err`` is NaN (the output error needs activations).
    """
    names = [n for n in ctx.table.linear_names if not config.ignores(ctx.full_name(n))]
    groups = ctx.table.sequential if true_sequential else (tuple(names),)
    reports = []
    for group in groups:
        group = [n for n in group if n in names]
        if not group:
            continue
        hessians = ctx.collect_hessians(group) if calibrated else dict.fromkeys(group)
        solutions = ctx.solve_layers(group, partial(timed_solve, ctx, config, solve, hessians))
        for name in group:
            linear = ctx.module(name)
            solution, seconds = solutions[name]
            with torch_threads(threads_for(linear.weight.numel())):
                quant = QuantLinear(solution.stored, linear.bias)
                deq = quant.dequantized_weight()  # cached: the block's forwards reuse it
                if calibrated:
                    w_err, h_err = relative_errors(linear.weight, deq, hessians[name])
                else:
                    w_err, h_err = weight_error(linear.weight, deq), math.nan
            ctx.replace(name, quant)
            reports.append(
                LayerReport(
                    ctx.full_name(name),
                    solution.stored.bits_per_weight(),
                    w_err,
                    h_err,
                    seconds,
                    solution.extra,
                )
            )
    return reports


def timed_solve(ctx, config, solve, hessians: dict[str, torch.Tensor],
                 name: str) -> tuple[Solution, float]:
    """``solve`` on linear ``name`` of the block, and the seconds it took (a small layer's
    solve runs on one thread: :mod:`lowbit.core.threads`)."""
    start = time.perf_counter()
    weight = ctx.module(name).weight
    with naming_layer(ctx.full_name(name)), torch_threads(threads_for(weight.numel())):
        solution = solve(config, weight, hessians[name])
    return solution, time.perf_counter() - start
