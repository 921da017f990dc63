"""LoRC, low-rank compensation (ZeroQuant-V2/FP): a rank-m SVD of the quantization error.

``E = W - W_q = U S V^T``; keep the ``m`` largest singular values and store
``U_m S_m^1/2`` ``[R, m]`` and ``S_m^1/2 V_m^T`` ``[m, C]`` in fp16, so that
``W ~= W_q + (U_m S_m^1/2)(S_m^1/2 V_m^T)``. The factors cost ``16 m (R + C) / (R C)`` bits per
weight: 0.0625 at 4096 x 4096, rank 8.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lowbit.nn.lowrank import LowRank


def lorc_factors(
    error: torch.Tensor, rank: int, dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of ``error``.

    Args:
        error: ``[R, C]`` float, ``W - W_q``.
        rank: ``1 .. min(R, C)``.
        dtype: storage dtype of the factors.
    Returns:
        ``U_m S_m^1/2`` ``[R, rank]`` and ``S_m^1/2 V_m^T`` ``[rank, C]`` in ``dtype`` (the SVD
        runs in float64).
    """
    rows, cols = error.shape
    if not 1 <= rank <= min(rows, cols):
        raise ValueError(f"LoRC rank must be in 1..{min(rows, cols)}, got {rank}")
    # top singular pairs from the eigendecomposition of the smaller Gram matrix, in float64
    a = error.detach().double()
    a = a.T if rows < cols else a  # [long side, short side]
    with _one_thread():
        lam, vec = torch.linalg.eigh(a.T @ a)  # ascending: the squared singular values
    sv = lam.flip(0)[:rank].clamp(min=0).sqrt()
    right = vec.flip(1)[:, :rank]  # [short, rank]
    left = torch.where(sv > 0, (a @ right) / sv.clamp(min=1e-300), 0.0)  # [long, rank]
    root = sv.sqrt()
    if rows < cols:
        left, right = right, left
    return (left * root).to(dtype), (root[:, None] * right.T).to(dtype)


def lorc(weight: torch.Tensor, quantized: torch.Tensor, rank: int) -> LowRank:
    """The LoRC add-on for ``weight`` and its dequantized ``quantized`` version, both ``[R, C]``."""
    return LowRank(*lorc_factors(weight.detach().float() - quantized.float(), rank))


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run a small LAPACK call on one thread: on a shared, oversubscribed CPU the threaded
    eigensolver waits at its barriers (measured 8.7 s vs 0.08 s at 576 x 576)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
