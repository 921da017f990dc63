"""Real FP8 execution of ZeroQuant-FP layers on GPUs with FP8 tensor cores (sm_89+, Hopper).

A block-scaled FP4 (or FP8) weight whose group scales differ per row only by powers of two (the
M1/M2 constraints) is *exactly* an FP8 E4M3 matrix times one fp32 scale per output row: an FP4
value ``e * r * 2**k`` is ``(e * 2**(k - k_ref)) * (r * 2**k_ref)`` and ``e * 2**d`` is an E4M3
number for ``-8 <= d <= 6``. :func:`fp8_weight` builds that form and checks it bit for bit
(``None`` when a weight does not cast exactly, e.g. unconstrained fp16 group scales). The input
is quantized per token (or per tensor) to FP8 with the same scales as the simulated path, and
``torch._scaled_mm`` multiplies with row-wise scales, fp32 accumulation and bf16 output.

:func:`plan_fp8` is the first CUDA planner for block-scaled weights
(:mod:`lowbit.kernels.gpu_paths`): for a layer with an FP8 activation quantizer it gives an
:class:`FP8Linear` (path ``fp8``), which takes the layer's input before activation quantization
and quantizes it itself. Without a capable GPU, or for a weight that is not exactly FP8, it
answers None and the layer runs the simulated path (activation fake-quant, then the next
planner's kernel or the reference): nothing is ever emulated here and called real.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lowbit.formats.codecs import stored_weight_from
from lowbit.formats.element import get_format
from lowbit.formats.fp import FloatFormat
from lowbit.kernels import dispatch
from lowbit.kernels.dispatch import Kernel, KernelRequest

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 9)
TORCH_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def availability() -> tuple[bool, str]:
    """(usable, reason): whether this process can run FP8 matmuls on a GPU, and why not."""
    if not torch.cuda.is_available():
        return False, "no CUDA device: the FP8 path is skipped, layers run the simulated path"
    cap = torch.cuda.get_device_capability()
    if cap < MIN_CAPABILITY:
        return False, f"GPU capability {cap[0]}.{cap[1]} has no FP8 tensor cores (needs 8.9+)"
    if not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no torch._scaled_mm"
    return True, f"FP8 tensor cores on {torch.cuda.get_device_name()}"


@dataclass(frozen=True)
class FP8Weight:
    """``W = weight.float() * row_scale[:, None]`` exactly.

    Attributes:
        weight: ``torch.float8_e4m3fn`` ``[N, K]``.
        row_scale: fp32 ``[N]``.
    """

    weight: torch.Tensor
    row_scale: torch.Tensor

    def to(self, device: torch.device) -> FP8Weight:
        return FP8Weight(self.weight.to(device), self.row_scale.to(device))


def fp8_weight(stored) -> FP8Weight | None:
    """The exact E4M3-times-row-scale form of a block-scaled FP weight, or ``None``.

    Args:
        stored: a stored weight (kind ``block`` with an FP element format; others give None).
    """
    if stored.kind != "block" or not isinstance(stored.config.element_format, FloatFormat):
        return None
    shift = get_format("fp8_e4m3").emax - stored.config.element_format.emax
    if shift < 0:
        return None
    row = stored.block_scales().effective().amax(dim=1) * 2.0**-shift  # exact: power of two
    w = stored.dequantize()
    scaled = w / row[:, None]  # exact whenever the quotient is an E4M3 value
    w8 = scaled.to(torch.float8_e4m3fn)
    if not torch.equal(w8.float(), scaled) or not torch.equal(w8.float() * row[:, None], w):
        return None
    return FP8Weight(w8, row.float())


def quantize_input(x: torch.Tensor, act) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 codes ``[M, K]`` of ``x`` ``[M, K]`` and fp32 scales ``[M, 1]`` for an
    :class:`~lowbit.nn.act_quant.ActQuantizer` with an FP8 format (same values as its forward:
    saturating round to nearest even)."""
    s = act.scales(x).expand(x.shape[0], 1).contiguous()
    limit = act.format.max
    return (x.float() / s).clamp(-limit, limit).to(TORCH_FP8[act.fmt]), s


def fp8_matmul(
    x: torch.Tensor, act, weight: FP8Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``Q(x) W^T + b`` as one FP8 ``torch._scaled_mm`` (row-wise scales, bf16 output).

    Args:
        x: ``[..., K]``, K and N multiples of 16. Returns ``[..., N]`` in ``x.dtype``.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    xq, s = quantize_input(x.reshape(-1, k), act)
    y = torch._scaled_mm(
        xq,
        weight.weight.t(),
        scale_a=s,
        scale_b=weight.row_scale[None, :],
        out_dtype=torch.bfloat16,
    )
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*lead, -1)


class FP8Linear(Kernel):
    """``Q(x) W^T + b`` through :func:`fp8_matmul` for CUDA inputs on the weight's device.

    Its tensors are plain attributes, not buffers (never saved, and left alone by a dtype cast
    of the model: the layer re-plans when its buffers move): ``weight`` an :class:`FP8Weight`,
    ``act_quant`` the layer's FP8 activation quantizer (the layer's submodule, not this one's),
    ``bias`` the layer's bias or None.
    """

    path = "fp8"
    quantizes_input = True
    frees_reference_cache = False  # a per-call path before; it never replaced the cache

    def __init__(self, weight: FP8Weight, act, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = weight
        self.__dict__["act_quant"] = act  # not registered: the layer owns (and saves) it
        self.bias = bias

    def accepts(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.device == self.weight.weight.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K]`` (not yet quantized) -> ``[..., N]`` in ``x.dtype``."""
        return fp8_matmul(x, self.act_quant, self.weight, self.bias)


def plan_fp8(request: KernelRequest) -> FP8Linear | None:
    """The FP8 kernel for a layer with an FP8 activation quantizer on a capable GPU whose weight
    is exactly FP8 (see :func:`fp8_weight`), K and N multiples of 16; else None."""
    act, stored = request.act_quant, request.stored
    if act is None or act.fmt not in TORCH_FP8 or request.device.type != "cuda":
        return None
    if not availability()[0] or stored.in_features % 16 or stored.out_features % 16:
        return None
    tensors = {name: t.cpu() for name, t in stored.tensors().items()}
    prepared = fp8_weight(stored_weight_from(stored.meta(), tensors))
    if prepared is None:
        log.info("weight of kind %s is not exactly FP8: simulated path", stored.meta())
        return None
    return FP8Linear(prepared.to(request.device), act, request.bias)


def linear(module, x: torch.Tensor) -> torch.Tensor | None:
    """The FP8 product for a QuantLinear ``module`` on a capable GPU, else ``None``: the kernel
    :func:`plan_fp8` gives, built afresh (the layer keeps nothing)."""
    kernel = plan_fp8(dispatch.request_for(module, x.dtype, x.device))
    return kernel(x) if kernel is not None and kernel.accepts(x) else None
