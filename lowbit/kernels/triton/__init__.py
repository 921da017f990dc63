"""Triton GPU kernels. Importing this package does not import triton: each kernel module is
loaded on first use, and a fast path or planner answers None (falls back) when triton is absent.

Modules: :mod:`.spqr` (SpQR, a per-call fast path), :mod:`.int_group` (group-wise INT2-8) and
:mod:`.fp4_block` (block-scaled FP4 E2M1), the last two prepared per layer by
:mod:`lowbit.kernels.gpu_paths`; :mod:`.common` (code loads, decoders, launch plan) and
:mod:`.aot` (builds for a GPU architecture without a GPU, to check registers and spills)."""

from __future__ import annotations

import importlib.util

import torch


def available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def spqr_fast_path(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Dispatch entry for SpQR linears on CUDA inputs (None elsewhere or without triton)."""
    if not x.is_cuda or not available():
        return None
    from lowbit.kernels.triton import spqr

    return spqr.spqr_linear(module, x)
