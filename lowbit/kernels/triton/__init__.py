"""Triton GPU kernels. Importing this package does not import triton: each kernel module is
loaded on first use, and a planner answers None (falls back) when triton is absent.

Modules: :mod:`.spqr` (SpQR), :mod:`.int_group` (group-wise INT2-8) and :mod:`.fp4_block`
(block-scaled FP4 E2M1), prepared per layer by :mod:`lowbit.kernels.gpu_paths`; :mod:`.common`
(code loads, decoders, launch plan) and :mod:`.aot` (builds for a GPU architecture without a
GPU, to check registers and spills)."""

from __future__ import annotations

import importlib.util


def available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None

