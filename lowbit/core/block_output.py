"""Running one decoder block on captured inputs, and stopping it early.

The engine (Hessian collection) and the weight-activation methods (statistics, candidate errors)
both run a block on its captured call arguments and stop it once a hook has what it needs.
"""

from __future__ import annotations

import torch
from torch import nn


class StopBlock(Exception):
    """Raised by an observing hook once it has what it needs: the rest of the block is not
    needed (the engine's Hessian collection, the weight-activation methods' statistics)."""


def block_output(block: nn.Module, x: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    """Hidden states ``[b, L, hidden]`` a block returns (tensor or first tuple element) for
    input ``x`` ``[b, L, hidden]`` and its captured call ``(args, kwargs)``."""
    args, kwargs = call
    out = block(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out
