"""Block-by-block quantization: capture, quantize block i, run the quantized block i to get the
inputs of block i+1. Only one block's calibration activations are alive at a time. With
checkpoints (:mod:`lowbit.engine.resume`) every finished block is persisted, and an interrupted
run continues from the next block."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.base import LayerReport, Method, MethodConfig
from lowbit.engine.capture import capture_block_inputs
from lowbit.engine.context import BlockContext, drop_dense_caches
from lowbit.engine.resume import BlockCheckpoints
from lowbit.models.arch import BlockTable, get_blocks

log = logging.getLogger(__name__)


@torch.no_grad()
def quantize_sequential(
    model: nn.Module,
    table: BlockTable,
    calib_ids: torch.Tensor,
    method: Method,
    config: MethodConfig,
    batch_size: int = 8,
    progress: bool = True,
    checkpoints: BlockCheckpoints | None = None,
) -> list[LayerReport]:
    """Quantize ``model`` in place with ``method``; calibration tokens ``[N, L]`` int64.

    With ``checkpoints``, finished blocks are restored from them first and each newly finished
    block is saved to them. Returns the per-linear reports in block order.
    """
    model.eval()
    blocks = get_blocks(model, table)
    restored = checkpoints.restore(blocks) if checkpoints is not None else None
    first = 0 if restored is None else restored.next_block
    reports: list[LayerReport] = [] if restored is None else restored.reports
    if first == len(blocks):
        return reports
    inputs = capture_block_inputs(model, blocks, calib_ids, batch_size)
    hidden = inputs.hidden
    if restored is not None:
        hidden = inputs.hidden = restored.hidden
    with tqdm(total=len(blocks), initial=first, disable=not progress, unit="block") as bar:
        for index in range(first, len(blocks)):
            bar.set_description(f"block {index + 1}/{len(blocks)}: {method.name}")
            ctx = BlockContext(
                blocks[index], index, f"{table.blocks}.{index}", table, hidden, inputs
            )
            block_reports, hidden = _quantize_block(ctx, method, config)
            reports.extend(block_reports)
            if checkpoints is not None:
                following = hidden if index + 1 < len(blocks) else None
                checkpoints.block_done(index, len(blocks), ctx.block, block_reports, following)
            bar.update(1)
    return reports


def _quantize_block(
    ctx: BlockContext, method: Method, config: MethodConfig
) -> tuple[list[LayerReport], list[torch.Tensor]]:
    """Quantize one block in place; its reports and its outputs (the next block's inputs)."""
    start = time.perf_counter()
    with torch.enable_grad():
        reports = method.apply_block(config, ctx)
    hidden = ctx.run()
    drop_dense_caches(ctx.block)
    log.debug("block %d done in %.1fs", ctx.index, time.perf_counter() - start)
    return reports, hidden
