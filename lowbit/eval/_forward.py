"""Shared pieces of the evaluation loops: batching, devices, chunked log-softmax bounds."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lowbit.errors import LowbitError

#: Elements of one fp32 [positions, vocab] temporary: 2**24 floats = 64 MiB (gemma3: 64 rows).
CHUNK_ELEMENTS = 1 << 24


def check_windows(windows: torch.Tensor, batch_size: int) -> None:
    """Validate ``windows``: integer ``[n_windows, seqlen]`` with ``seqlen >= 2``."""
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise LowbitError(
            f"windows must be a [n_windows, seqlen] tensor with seqlen >= 2, got shape "
            f"{tuple(windows.shape)}; build it with lowbit.eval.eval_windows"
        )
    if windows.dtype not in (torch.int64, torch.int32):
        raise LowbitError(f"windows must hold token ids (int64), got {windows.dtype}")
    if batch_size < 1:
        raise LowbitError(f"batch_size must be at least 1, got {batch_size}")


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's input embedding (where ``input_ids`` must go)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive row blocks of ``windows`` (``[<=batch_size, seqlen]`` int64)."""
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size].long()


def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, L, V]`` (model dtype) for ``input_ids`` ``[B, L]``, no KV cache."""
    out = model(input_ids=input_ids.to(model_device(model)), use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits


def chunk_rows(vocab: int) -> int:
    """How many positions to log-softmax at once so a temporary stays near 64 MiB."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` + ``torch.inference_mode`` for the block; training flags restored."""
    was_training = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.inference_mode():
            yield
    finally:
        for m, flag in zip(models, was_training, strict=True):
            m.train(flag)
