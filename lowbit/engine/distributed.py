"""Multi-process calibration with torch.distributed (launched by ``torchrun``).

Every rank holds the whole model and a share of the calibration windows (windows ``rank``,
``rank + world``, ...). Per block, each rank accumulates the Hessians of its windows; they are
summed over ranks (weighted by token counts) so every rank holds the Hessian of all windows. The
linears of a group are then solved in parallel, linear ``k`` on rank ``k % world``, and the
solutions are exchanged, so every rank installs the same quantized block and propagates its own
windows through it. Backends: gloo on CPU, NCCL when CUDA is present. With one process
everything here is a no-op.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; across nodes use
``torchrun --nnodes N --node-rank I --rdzv-endpoint HOST:PORT`` as usual (docs/RELIABILITY.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from lowbit.engine.placement import default_cuda_index


def init_from_env() -> bool:
    """Join the process group described by torchrun's environment; False for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():  # NCCL's collectives run on this process's own GPU
            torch.cuda.set_device(default_cuda_index())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _comm_device() -> torch.device:
    """Where small bookkeeping tensors must be for a collective: the process's GPU under NCCL,
    the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """This process writes files and prints (rank 0, or the only process)."""
    return rank_and_world()[0] == 0


def shard(ids: torch.Tensor) -> torch.Tensor:
    """This rank's calibration windows of ``ids`` ``[N, L]``: rows ``rank::world``."""
    rank, world = rank_and_world()
    if world > 1 and ids.shape[0] < world:
        raise ValueError(f"{ids.shape[0]} calibration windows cannot be split over {world} "
                         "processes; raise --nsamples or use fewer processes")
    return ids[rank::world]


def sum_hessian(hessian: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
    """The token-weighted mean of the ranks' Hessians ``[C, C]`` and the total token count."""
    if rank_and_world()[1] == 1:
        return hessian, tokens
    comm = _comm_device()
    total = hessian.to(comm) * tokens
    count = torch.tensor([float(tokens)], dtype=torch.float64, device=comm)
    dist.all_reduce(total)
    dist.all_reduce(count)
    n = int(count.item())
    return (total / n).to(hessian.device), n


def max_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Per key, the maximum over ranks (activation ranges)."""
    if rank_and_world()[1] == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist(), strict=True))


def solve_shared(names: list[str], solve: Callable[[str], Any]) -> dict[str, Any]:
    """``{name: solve(name)}``, each name solved on one rank (``k % world``) and exchanged.

    ``solve`` must return a picklable object (tensors included).
    """
    rank, world = rank_and_world()
    if world == 1:
        return {name: solve(name) for name in names}
    mine = {name: solve(name) for k, name in enumerate(names) if k % world == rank}
    gathered: list[dict[str, Any] | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    out: dict[str, Any] = {}
    for part in gathered:
        out.update(part or {})
    return {name: out[name] for name in names}
