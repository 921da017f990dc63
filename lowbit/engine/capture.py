"""Capture what decoder block 0 receives, and the keyword arguments every block receives.

Every block is swapped for a catcher for one pass of the calibration batches: block 0's catcher
keeps the hidden states, each catcher keeps its block's keyword arguments (position embeddings,
attention masks, ... which differ between block types, e.g. Gemma-3's sliding vs. full
attention), and the last catcher stops the forward pass before the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.core.block_output import block_output  # noqa: F401  (engine users import it here)


class _StopForward(Exception):
    """Raised by the last catcher: nothing after the blocks needs to run."""


@dataclass
class BlockInputs:
    """Calibration inputs of block 0 and the call arguments of every block.

    Attributes:
        hidden: list of ``[b, L, hidden]`` tensors, one per calibration batch.
        calls: ``calls[i][b]`` = (extra positional args, kwargs) block i receives for batch size b.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    calls: list[dict[int, tuple[tuple, dict[str, Any]]]] = field(default_factory=list)

    def call_for(self, block_index: int, x: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
        """The call arguments of block ``block_index`` for hidden states ``x`` ``[b, L, H]``.

        A batch size never captured (micro-batches of a training method) is served from a
        larger captured one: its tensors whose first dimension is that batch size keep their
        first ``b`` rows (calibration windows are unpadded, so those rows are all alike).
        """
        calls = self.calls[block_index]
        b = x.shape[0]
        if b in calls:
            return calls[b]
        larger = [size for size in calls if size > b]
        if not larger:
            raise KeyError(f"no captured call of block {block_index} for batch size {b}")
        size = min(larger)
        args, kwargs = calls[size]
        calls[b] = (_rows(args, size, b), _rows(kwargs, size, b))
        return calls[b]


class _Catcher(nn.Module):
    def __init__(self, index: int, last: bool, store: BlockInputs) -> None:
        super().__init__()
        self.index, self.last, self.store = index, last, store

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.index == 0:
            self.store.hidden.append(hidden_states.detach())
        self.store.calls[self.index].setdefault(hidden_states.shape[0], (args, kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int
) -> BlockInputs:
    """Run ``input_ids`` ``[N, L]`` through the embeddings and record every block's inputs."""
    store = BlockInputs(calls=[{} for _ in blocks])
    originals = list(blocks)
    for i in range(len(blocks)):
        blocks[i] = _Catcher(i, i == len(blocks) - 1, store)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start : start + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return store


def _rows(value: Any, size: int, b: int) -> Any:
    """``value`` (nested tuples/lists/dicts of tensors) with batch-``size`` tensors cut to ``b``."""
    if isinstance(value, torch.Tensor):
        return value[:b] if value.dim() and value.shape[0] == size else value
    if isinstance(value, tuple | list):
        return type(value)(_rows(v, size, b) for v in value)
    if isinstance(value, dict):
        return {k: _rows(v, size, b) for k, v in value.items()}
    return value
