"""Which CUDA kernel each stored-weight format gets (the planners registered for device
``cuda``, in the order registered here).

For layers with an FP8 activation quantizer on a GPU with FP8 tensor cores (sm_89+), a
block-scaled weight that is exactly an FP8 matrix times a row scale (ZeroQuant-FP M1/M2):
``fp8`` (:mod:`lowbit.kernels.fp8_gpu`, ``torch._scaled_mm``; it quantizes the input itself).

Otherwise, when triton can be imported, for fp16/bf16/fp32 activations on a CUDA device:

- ``int`` (:class:`~lowbit.formats.packed_int.PackedIntWeight`), 2-8 bits (INT4, INT3 streams,
  ...), any group size (ragged last group) or one group per row, symmetric or asymmetric
  (integer-code or fp16 zeros), with or without act-order: ``triton-int<bits>``
  (:mod:`lowbit.kernels.triton.int_group`);
- ``block`` (:class:`~lowbit.formats.packed_block.PackedBlockWeight`) with FP4 E2M1 elements
  and fp32/fp16/bf16 block scales (ZeroQuant-FP "none"), E8M0 scales (M1, MX), M2 (per-row
  real scale times E8M0 ratios) or FP8 E4M3 scales with a tensor scale (NVFP4): ``triton-fp4``
  (:mod:`lowbit.kernels.triton.fp4_block`);
- ``spqr`` (:class:`~lowbit.formats.spqr_weight.SpQRWeight`), any activation dtype:
  ``triton-spqr`` (:mod:`lowbit.kernels.triton.spqr`).

Anything else gets no prepared kernel on CUDA (the reference). The Triton kernels read the
layer's own packed buffers (shared, not copied); only the act-order permutation is widened to
int64 once. Importing this module does not import triton (the kernel modules load on the first
call); QuantLinear imports it.
"""

from __future__ import annotations

import torch

from lowbit.formats.intfmt import DtypeFormat
from lowbit.formats.packed_block import PackedBlockWeight
from lowbit.formats.packed_int import PackedIntWeight
from lowbit.formats.spqr_weight import SpQRWeight
from lowbit.kernels import dispatch, fp8_gpu
from lowbit.kernels import triton as triton_kernels
from lowbit.kernels.dispatch import Kernel

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_WEIGHTS = 2**31 - 1  # the kernels index codes with int32


def _runs(stored, dtype: torch.dtype) -> bool:
    """Whether a Triton kernel may take ``stored`` with activations of ``dtype``."""
    return (dtype in ACTIVATION_DTYPES and triton_kernels.available()
            and stored.out_features * stored.in_features <= MAX_WEIGHTS)


class TritonLinear(Kernel):
    """``y = x W^T + b`` for inputs on the weight's CUDA device, through a Triton kernel.

    Buffers (non-persistent, never saved): the stored weight's tensors (the layer's own),
    ``perm`` int64 ``[K]`` for act-order weights, ``bias`` ``[N]`` or None.
    """

    path = "triton"

    def __init__(self, stored, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = stored.in_features
        self.out_features = stored.out_features
        for name, tensor in stored.tensors().items():
            if name != "perm":
                self.register_buffer(name, tensor, persistent=False)
        perm = getattr(stored, "perm", None)
        self.register_buffer("perm", None if perm is None else perm.long(), persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def accepts(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.device == self.qweight.device and x.dtype in ACTIVATION_DTYPES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)  # stored column order, once per call
        return self.matmul(x2).reshape(*lead, self.out_features)  # defined by each subclass

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, {self.path}"


class TritonIntLinear(TritonLinear):
    """Group-wise integer weight; see :func:`lowbit.kernels.triton.int_group.int_matmul`."""

    def __init__(self, stored: PackedIntWeight, bias: torch.Tensor | None) -> None:
        super().__init__(stored, bias)
        if stored.zeros is None:
            self.register_buffer("zeros", None, persistent=False)
        self.bits = stored.grid.bits
        self.group = stored.grid.group_width(stored.in_features)
        self.path = f"triton-int{self.bits}"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K]`` in stored column order -> ``[M, N]``."""
        from lowbit.kernels.triton.int_group import int_matmul

        return int_matmul(x, self.qweight, self.scales, self.zeros, self.bits, self.group,
                          self.bias)


class TritonFP4Linear(TritonLinear):
    """Block-scaled FP4 E2M1 weight; see :func:`lowbit.kernels.triton.fp4_block.fp4_matmul`."""

    path = "triton-fp4"

    def __init__(self, stored: PackedBlockWeight, bias: torch.Tensor | None, scale_kind: str):
        super().__init__(stored, bias)
        for name in ("row_scales", "tensor_scale"):
            if getattr(stored, name) is None:
                self.register_buffer(name, None, persistent=False)
        self.group_size = stored.config.group_size
        self.scale_kind = scale_kind

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K]`` -> ``[M, N]``."""
        from lowbit.kernels.triton.fp4_block import fp4_matmul

        return fp4_matmul(x, self.qweight, self.scales, self.out_features, self.group_size,
                          self.scale_kind, self.row_scales, self.tensor_scale, self.bias)


def fp4_scale_kind(stored: PackedBlockWeight) -> str | None:
    """How the FP4 kernel decodes ``stored``'s block scales (``float``, ``e8m0``, ``e4m3``), or
    None when the weight is not FP4 E2M1 or its scale format is one the kernel lacks."""
    cfg = stored.config
    if cfg.element != "fp4_e2m1":
        return None
    if cfg.scale_rule == "m2" or cfg.scale_format == "e8m0":
        return "e8m0"
    if cfg.scale_format == "fp8_e4m3":
        return "e4m3"
    if isinstance(cfg.scale_fmt, DtypeFormat) and stored.scales.dtype in ACTIVATION_DTYPES:
        return "float"
    return None


class TritonSpQRLinear(TritonLinear):
    """SpQR weight; see :func:`lowbit.kernels.triton.spqr.spqr_matmul` (fp32 result, then the
    bias in fp32, then ``x.dtype``)."""

    path = "triton-spqr"
    frees_reference_cache = False  # a per-call path before; it never replaced the cache

    def __init__(self, stored, bias: torch.Tensor | None) -> None:
        super().__init__(stored, bias)
        self.meta = stored.meta()
        self.names = tuple(n for n in stored.tensors() if n != "perm")

    def accepts(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.device == self.qweight.device

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K]`` in stored column order -> ``[M, N]`` in ``x.dtype``."""
        from lowbit.kernels.triton.spqr import spqr_matmul

        y = spqr_matmul(x, self.meta, {n: getattr(self, n) for n in self.names})
        if self.bias is not None:
            y += self.bias.float()
        return y.to(x.dtype)


def plan_int(request: dispatch.KernelRequest):
    """``triton-int<bits>`` for any integer weight, or None (no triton, more than 2**31 - 1
    weights)."""
    stored = request.stored
    return TritonIntLinear(stored, request.bias) if _runs(stored, request.dtype) else None


def plan_block(request: dispatch.KernelRequest):
    """``triton-fp4`` for FP4 E2M1 block-scaled weights, or None (other elements or scale
    formats, no triton, more than 2**31 - 1 weights)."""
    stored = request.stored
    if not _runs(stored, request.dtype):
        return None
    kind = fp4_scale_kind(stored)
    return None if kind is None else TritonFP4Linear(stored, request.bias, kind)


def plan_spqr(request: dispatch.KernelRequest):
    """``triton-spqr`` for any SpQR weight when triton can be imported, else None."""
    return TritonSpQRLinear(request.stored, request.bias) if triton_kernels.available() else None


dispatch.register_planner(PackedIntWeight.kind, plan_int, device="cuda")
dispatch.register_planner(PackedBlockWeight.kind, fp8_gpu.plan_fp8, device="cuda")  # first
dispatch.register_planner(PackedBlockWeight.kind, plan_block, device="cuda")
dispatch.register_planner(SpQRWeight.kind, plan_spqr, device="cuda")
