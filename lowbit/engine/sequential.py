"""Block-by-block quantization: capture, quantize block i, run the quantized block i to get the
inputs of block i+1. Only one block's calibration activations are alive at a time. With
checkpoints (:mod:`lowbit.engine.resume`) every finished block is persisted, and an interrupted
run continues from the next block. With a :class:`~lowbit.engine.streaming.BlockStream` the
blocks start on the meta device: each group's weights are read from disk just before it is
quantized, and the group is released once it is checkpointed.

With a compute ``device`` the model stays where it is (CPU memory, or disk when streamed): each
group of blocks moves to the device for its calibration and solve and back before it is
checkpointed; the calibration activations live on the device when they fit in its free memory
(:func:`lowbit.engine.placement.activation_home`), else in pinned CPU memory."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.core.config import MethodConfig
from lowbit.core.method import Method
from lowbit.core.report import LayerReport
from lowbit.engine.capture import BlockInputs, capture_block_inputs
from lowbit.engine.context import BlockContext, GroupContext, drop_dense_caches, run_blocks
from lowbit.engine.placement import CPU, activation_home, home, module_bytes, to_device
from lowbit.engine.preflight import activation_copies
from lowbit.engine.resume import BlockCheckpoints
from lowbit.engine.streaming import BlockStream
from lowbit.memory import trim_heap
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
    stream: BlockStream | None = None,
    all_experts: bool = False,
    device: torch.device | None = None,
) -> list[LayerReport]:
    """Quantize ``model`` in place with ``method``; calibration tokens ``[N, L]`` int64.

    ``all_experts``: every expert of a mixture-of-experts block is calibrated on every token
    (see :class:`~lowbit.engine.context.BlockContext`).

    With ``checkpoints``, finished blocks are restored from them first and each newly finished
    block is saved to them. With ``stream`` (which needs ``checkpoints``: they hold the
    quantized blocks), blocks are loaded from disk one group at a time and released after.
    ``device`` (default: the CPU) is where each group computes (see the module doc).
    Returns the per-linear reports in block order. A method that needs no calibration
    (:meth:`~lowbit.core.method.Method.needs_calibration`) runs with no calibration forward at
    all (``calib_ids`` unused).
    """
    assert stream is None or checkpoints is not None, "a streamed run needs checkpoints"
    model.eval()
    blocks = get_blocks(model, table)
    release = stream.release if stream is not None else None
    restored = checkpoints.restore(blocks, release) if checkpoints is not None else None
    first = 0 if restored is None else restored.next_block
    reports: list[LayerReport] = [] if restored is None else restored.reports
    if first == len(blocks):
        return reports
    if method.needs_calibration(config):
        inputs = capture_block_inputs(model, blocks, calib_ids, batch_size)
    else:  # no calibration forward: the blocks get no inputs (and pass none on)
        inputs = BlockInputs(calls=[{} for _ in blocks])
    hidden, inputs.hidden = inputs.hidden, []  # the loop holds the only reference
    if restored is not None:
        hidden = restored.hidden
    size = method.group_blocks(config)
    device = CPU if device is None else device
    inputs.calls = [to_device(calls, device) for calls in inputs.calls]
    hidden = _place_activations(hidden, device, size, blocks[first])
    with tqdm(total=len(blocks), initial=first, disable=not progress, unit="block") as bar:
        for start in range(first, len(blocks), size):
            indices = range(start, min(start + size, len(blocks)))
            if stream is not None:
                for i in indices:
                    stream.load(blocks[i], i)
            origins = {i: _device_of(blocks[i]) for i in indices}
            contexts = [
                BlockContext(blocks[i].to(device), i, f"{table.blocks}.{i}", table, hidden,
                             inputs, all_experts, device=device)
                for i in indices
            ]
            group_reports, hidden = _quantize_group(contexts, method, config, bar)
            for i in indices:  # back where it was, before it is checkpointed or released
                blocks[i].to(origins[i])
            reports.extend(r for block_reports in group_reports for r in block_reports)
            if checkpoints is not None:
                _checkpoint_group(checkpoints, contexts, group_reports, hidden, len(blocks))
            if stream is not None:
                for ctx in contexts:
                    stream.release(ctx.block, ctx.index)
            del contexts  # the group's inputs go before the next group's outputs come
            trim_heap()  # else freed activations stay resident (lowbit.memory.trim_heap)
    return reports


def _device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (the CPU for one without)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return CPU


def _place_activations(
    hidden: list[torch.Tensor], device: torch.device, group_blocks: int, block: nn.Module
) -> list[torch.Tensor]:
    """``hidden`` moved to their home for a run computing on ``device``: the device when the
    pre-flight's copies of them (:func:`~lowbit.engine.preflight.activation_copies`) fit in
    its free memory beside the group's blocks (weights and dequantized copies), else pinned
    CPU memory."""
    nbytes = sum(x.numel() * x.element_size() for x in hidden)
    reserve = 2 * group_blocks * module_bytes(block)
    where = activation_home(device, activation_copies(group_blocks) * nbytes, reserve)
    log.info("calibration activations (%.1f MiB) live on %s", nbytes / 2**20, where)
    pin = device.type == "cuda"
    return [home(x, where, pin) for x in hidden]


def _quantize_group(
    contexts: list[BlockContext], method: Method, config: MethodConfig, bar: tqdm
) -> tuple[list[list[LayerReport]], list[torch.Tensor]]:
    """Quantize consecutive blocks (one, unless the method has ``finish_group``) in place; the
    reports of each block and the group's outputs (the next block's inputs)."""
    group_in = contexts[0].hidden
    targets = run_blocks(contexts, group_in) if method.finish_group is not None else None
    per_block: list[list[LayerReport]] = []
    hidden = group_in
    for ctx in contexts:
        bar.set_description(f"block {ctx.index + 1}/{bar.total}: {method.name}")
        ctx.hidden = hidden
        block_reports, hidden = _quantize_block(ctx, method, config)
        per_block.append(block_reports)
        bar.update(1)
    if targets is None:
        return per_block, hidden
    bar.set_description(f"blocks {contexts[0].index + 1}-{contexts[-1].index + 1}: "
                        f"{method.name} group")
    group = GroupContext(contexts, group_in, targets)
    with torch.enable_grad():
        updated = {r.name: r for r in method.finish_group(config, group, per_block)}
    per_block = [[updated.get(r.name, r) for r in block] for block in per_block]
    hidden = run_blocks(contexts, group_in)
    for ctx in contexts:
        drop_dense_caches(ctx.block)
    return per_block, hidden


def _checkpoint_group(
    checkpoints: BlockCheckpoints,
    contexts: list[BlockContext],
    per_block: list[list[LayerReport]],
    hidden: list[torch.Tensor],
    total: int,
) -> None:
    """Persist a finished group: its blocks, then the state that makes it count as done."""
    for ctx, block_reports in zip(contexts[:-1], per_block[:-1], strict=True):
        checkpoints.save_block(ctx.index, ctx.block, block_reports)
    last = contexts[-1]
    following = hidden if last.index + 1 < total else None
    checkpoints.block_done(last.index, total, last.block, per_block[-1], following)


def _quantize_block(
    ctx: BlockContext, method: Method, config: MethodConfig
) -> tuple[list[LayerReport], list[torch.Tensor]]:
    """Quantize one block in place; its reports and its outputs (the next block's inputs)."""
    start = time.perf_counter()
    with torch.enable_grad():
        reports = method.apply_block(config, ctx)
    for report in reports:  # how many tokens each Hessian saw (an expert: those routed to it)
        local = report.name.removeprefix(f"{ctx.prefix}.")
        if local in ctx.calib_tokens:
            report.extra.setdefault("calib_tokens", ctx.calib_tokens[local])
    hidden = ctx.run() if ctx.hidden else []
    drop_dense_caches(ctx.block)
    log.debug("block %d done in %.1fs", ctx.index, time.perf_counter() - start)
    return reports, hidden
