"""Block-by-block quantization: capture, quantize block i, run the quantized block i to get the
inputs of block i+1. Only one block's calibration activations are alive at a time."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.base import LayerReport, Method, MethodConfig
from lowbit.engine.capture import capture_block_inputs
from lowbit.engine.context import BlockContext, drop_dense_caches
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
) -> list[LayerReport]:
    """Quantize ``model`` in place with ``method``; calibration tokens ``[N, L]`` int64.

    Returns the per-linear reports in block order.
    """
    model.eval()
    blocks = get_blocks(model, table)
    inputs = capture_block_inputs(model, blocks, calib_ids, batch_size)
    hidden = inputs.hidden
    reports: list[LayerReport] = []
    bar = tqdm(total=len(blocks), disable=not progress, unit="block")
    for index, block in enumerate(blocks):
        bar.set_description(f"block {index + 1}/{len(blocks)}: {method.name}")
        start = time.perf_counter()
        ctx = BlockContext(block, index, f"{table.blocks}.{index}", table, hidden, inputs)
        with torch.enable_grad():
            block_reports = method.apply_block(config, ctx)
        hidden = ctx.run()
        drop_dense_caches(block)
        reports.extend(block_reports)
        log.debug("block %d done in %.1fs", index, time.perf_counter() - start)
        bar.update(1)
    bar.close()
    return reports
