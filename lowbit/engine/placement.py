"""Where a run computes and where its calibration activations live.

The model stays in CPU memory (or on disk, streamed); the engine moves each decoder block to the
compute device for its calibration and solve, and back afterwards. Calibration activations stay
on the compute device when they fit in its free memory (:func:`activation_home`), otherwise in
CPU memory, pinned when the device is CUDA so that each batch's copy to it is a plain DMA.
On the CPU every function here is the identity: the CPU path is the one that ran before
devices existed.
"""

from __future__ import annotations

import os
from typing import Any

import torch

CPU = torch.device("cpu")
# what ``auto`` means when set (``cpu``, ``cuda``, ``cuda:N``); unset: CUDA when available. The
# test suite sets it to ``cpu`` so that its stored numbers hold on a machine with a GPU too.
AUTO_ENV = "LOWBIT_AUTO_DEVICE"
# keep this share of the device's free memory out of the activations' budget: the allocator's
# fragmentation, kernels' workspaces, what other processes allocate meanwhile
FREE_MARGIN = 0.10


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The compute device of ``spec``: ``auto`` (or None) = ``cuda`` when CUDA is available,
    else ``cpu`` (``$LOWBIT_AUTO_DEVICE`` overrides that); ``cpu``, ``cuda``, ``cuda:N``.
    ``auto`` and ``cuda`` without an index mean this process's GPU: ``cuda:$LOCAL_RANK`` under
    torchrun (one GPU per process), the current device otherwise.
    ValueError for a device this machine lacks."""
    if spec is None or spec == "auto":
        if os.environ.get(AUTO_ENV, "auto") != "auto":
            return resolve_device(os.environ[AUTO_ENV])
        return torch.device("cuda", default_cuda_index()) if _cuda() else CPU
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"'{spec}' is not a device (auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cpu":
        return CPU
    if device.type != "cuda":
        raise ValueError(f"device type '{device.type}' is not supported (auto, cpu, cuda, cuda:N)")
    if not _cuda():
        raise ValueError(
            f"'{spec}' asked for, but CUDA is not available here (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda or 'none'}); use --device cpu or auto"
        )
    index = default_cuda_index() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"'{spec}' asked for, but this machine has {torch.cuda.device_count()} CUDA "
            f"device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
        )
    return torch.device("cuda", index)


def _cuda() -> bool:
    return torch.cuda.is_available()


def default_cuda_index() -> int:
    """This process's GPU: ``$LOCAL_RANK`` (set by torchrun; wraps round the visible devices
    when there are more processes than GPUs), else torch's current device."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and local_rank.isdigit():
        return int(local_rank) % torch.cuda.device_count()
    return torch.cuda.current_device()


def activation_home(
    device: torch.device, activation_bytes: int, reserve_bytes: int
) -> torch.device:
    """Where calibration activations live for a run computing on ``device``: ``device`` when
    ``activation_bytes`` (every copy alive at once) plus ``reserve_bytes`` (the block and its
    working memory) fit in its free memory less :data:`FREE_MARGIN`, else the CPU."""
    if device.type != "cuda":
        return device
    free, _total = torch.cuda.mem_get_info(device)
    fits = activation_bytes + reserve_bytes <= free * (1 - FREE_MARGIN)
    return device if fits else CPU


def home(t: torch.Tensor, where: torch.device, pin: bool) -> torch.Tensor:
    """``t`` in its home ``where``: unchanged when it is there already; a copy in CPU memory
    (page-locked with ``pin``) otherwise."""
    if t.device == where and (not pin or where.type != "cpu" or t.is_pinned()):
        return t
    if where.type == "cpu" and pin:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t)
    return t.to(where)


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` (nested tuples/lists/dicts of tensors and other objects) with every tensor on
    ``device`` (the same objects where they are there already)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=value.is_pinned())
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (meta tensors count as they will load)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
