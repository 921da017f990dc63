"""Chooses the matmul for a quantized linear.

One mechanism: registered *planners* (:func:`register_planner`; the CPU ones in
:mod:`lowbit.kernels.cpu_paths` and :mod:`lowbit.kernels.spqr_cpu`, the CUDA ones, Triton and
real FP8, in :mod:`lowbit.kernels.gpu_paths`). For a :class:`KernelRequest` (the stored weight,
bias, activation quantizer, activation dtype and device) the planners registered for the
device and the weight's kind are tried in order, then those for :data:`ANY_KIND`; the first
that answers gives the layer's *prepared kernel*: a :class:`Kernel` module (``accepts(x)``,
``forward(x)``, ``path``) holding the weight in the form its op reads. :func:`prepare` does it
at load time; :func:`linear` does it on the first call with a new dtype/device/storage when
nobody did (never while ``torch.compile`` traces). The layer keeps the kernel and the key it
was planned for (:meth:`lowbit.nn.quant_linear.QuantLinear.attach_kernel`).

When no planner answers, when the layer's kernel mode is ``reference``, or when the prepared
kernel does not accept an input, the reference dequantize-and-matmul runs (the oracle tests
compare against).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.kernels import reference

MODES = ("auto", "reference")  # a QuantLinear's kernel mode


class Kernel(nn.Module):
    """A prepared kernel: ``y = x W^T + b`` for the inputs it :meth:`accepts`.

    Its tensors are non-persistent buffers or plain attributes: never saved with the layer.

    Attributes:
        path: the name :func:`path_name` reports (``int4``, ``dense``, ``triton-fp4``, ...).
        quantizes_input: True when :meth:`forward` takes the layer's input before activation
            quantization and quantizes it itself (the FP8 GPU kernel); otherwise the layer's
            activation quantizer runs first.
        frees_reference_cache: whether attaching it drops the layer's cached fp32 dequantized
            weight (kernels that replace it do; those that read the packed buffers per call,
            SpQR's tiled fp32 and Triton paths and the FP8 GPU path, leave it).
    """

    path = "kernel"
    quantizes_input = False
    frees_reference_cache = True

    def accepts(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` runs ``x`` (device, dtype); otherwise the reference runs."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class KernelRequest:
    """What a planner sees of a layer.

    Attributes:
        stored: the layer's stored weight (its tensors are the layer's buffers).
        bias: ``[out_features]`` or None.
        act_quant: the layer's :class:`~lowbit.nn.act_quant.ActQuantizer`, or None.
        dtype: the activation dtype.
        device: the activations' device.
    """

    stored: object
    bias: torch.Tensor | None
    act_quant: nn.Module | None
    dtype: torch.dtype
    device: torch.device


Planner = Callable[[KernelRequest], "Kernel | None"]
_PLANNERS: dict[tuple[str, str], list[Planner]] = {}  # (device type, kind) -> planners
ANY_KIND = "*"  # planners tried for every kind, after the kind's own


def register_planner(kind: str, fn: Planner, device: str = "cpu") -> Planner:
    """Add a planner for stored weights of ``kind`` (or :data:`ANY_KIND`) and inputs on
    ``device`` (a device type: ``cpu``, ``cuda``), tried in order."""
    _PLANNERS.setdefault((device, kind), []).append(fn)
    return fn


def request_for(
    module: nn.Module, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> KernelRequest:
    """The :class:`KernelRequest` of a QuantLinear ``module`` for activations of ``dtype`` on
    ``device``."""
    return KernelRequest(
        module.stored_weight(), module.bias, module.act_quant, dtype, torch.device(device)
    )


def plan(request: KernelRequest) -> Kernel | None:
    """The prepared kernel for ``request``, or None (then the reference runs)."""
    dev, kind = request.device.type, request.stored.kind
    for fn in _PLANNERS.get((dev, kind), []) + _PLANNERS.get((dev, ANY_KIND), []):
        kernel = fn(request)
        if kernel is not None:
            return kernel
    return None


def _key(module: nn.Module, dtype: torch.dtype, device: str | torch.device) -> tuple:
    """(activation dtype, device type, address of the layer's first stored tensor)."""
    first = getattr(module, module.tensor_names[0])
    return (dtype, torch.device(device).type, first.data_ptr())


def prepare(module: nn.Module, dtype: torch.dtype, device: str | torch.device = "cpu") -> str:
    """Choose ``module``'s kernel for activations of ``dtype`` on ``device`` and attach it
    (None when no planner answers). Returns the path name (see :func:`path_name`)."""
    kernel = plan(request_for(module, dtype, device))
    module.attach_kernel(kernel, _key(module, dtype, device))
    return path_name(module)


def path_name(module: nn.Module) -> str:
    """``int4``, ``int8``, ``dense``, ``spqr-int4``, ``spqr-tiled``, ``triton-int4``, ``fp8``,
    ... for a prepared kernel; ``reference`` when none is prepared."""
    return "reference" if module.fast is None else module.fast.path


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``y = Q(x) W^T + b`` for a QuantLinear ``module`` (``Q``: its activation quantizer, when
    it has one), through its prepared kernel in kernel mode ``auto``, else the reference.

    Args:
        x: ``[..., C']``, the layer's input after any reassembly, before activation
            quantization. Returns ``[..., out_features]`` in ``x.dtype``.
    """
    kernel = None
    if module.kernel == "auto":
        if not torch.compiler.is_compiling() and module.fast_key != _key(
            module, x.dtype, x.device
        ):
            prepare(module, x.dtype, x.device)
        kernel = module.fast
    if kernel is not None and kernel.quantizes_input and kernel.accepts(x):
        return kernel(x)
    if module.act_quant is not None:
        x = module.act_quant(x)
    if kernel is not None and not kernel.quantizes_input and kernel.accepts(x):
        return kernel(x)
    return reference.linear(x, module.dequantized_weight(), module.bias)
