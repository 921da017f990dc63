"""Chooses the matmul for a quantized linear.

Two mechanisms, tried in this order for ``kernel="auto"``:

1. A *prepared kernel* chosen once per layer for an activation dtype and device by the
   registered planners (:func:`register_planner`; the CPU ones are in
   :mod:`lowbit.kernels.cpu_paths`, the CUDA/Triton ones in :mod:`lowbit.kernels.gpu_paths`):
   a small ``nn.Module`` (``accepts(x)``, ``forward(x)``, ``path``) holding the weight in the
   form its op reads, attached to the layer as ``module.fast``. :func:`prepare` does it at
   load time; :func:`linear` does it on the first call with a new dtype/device when nobody did
   (never while ``torch.compile`` traces).
2. Per-call fast paths registered by kind (:func:`register_fast_path`), e.g. SpQR's tiled fp32
   CPU path and its Triton kernel.

Otherwise the reference dequantize-and-matmul runs (the oracle tests compare against).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.kernels import reference

# kind -> fn(module, x) returning y, or None when it does not apply to this module/input.
FastPath = Callable[[torch.nn.Module, torch.Tensor], "torch.Tensor | None"]
_FAST_PATHS: dict[str, list[FastPath]] = {}

# kind -> fn(stored weight, bias, activation dtype) returning a kernel module, or None.
Planner = Callable[[object, "torch.Tensor | None", torch.dtype], "torch.nn.Module | None"]
_PLANNERS: dict[tuple[str, str], list[Planner]] = {}  # (device type, kind) -> planners
ANY_KIND = "*"  # planners tried for every kind, after the kind's own


def register_fast_path(kind: str, fn: FastPath) -> FastPath:
    """Add a per-call fast path for stored weights of ``kind`` (tried in registration order)."""
    _FAST_PATHS.setdefault(kind, []).append(fn)
    return fn


def register_planner(kind: str, fn: Planner, device: str = "cpu") -> Planner:
    """Add a planner for stored weights of ``kind`` (or :data:`ANY_KIND`) and inputs on
    ``device`` (a device type: ``cpu``, ``cuda``), tried in order."""
    _PLANNERS.setdefault((device, kind), []).append(fn)
    return fn


def plan(
    stored, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module | None:
    """The prepared kernel for ``stored`` and activations of ``dtype`` on ``device``, or None
    (then per-call paths and the reference run): CPU ones in :mod:`lowbit.kernels.cpu_paths`,
    CUDA (Triton) ones in :mod:`lowbit.kernels.gpu_paths`."""
    dev = torch.device(device).type
    for fn in _PLANNERS.get((dev, stored.kind), []) + _PLANNERS.get((dev, ANY_KIND), []):
        kernel = fn(stored, bias, dtype)
        if kernel is not None:
            return kernel
    return None


def _key(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> tuple:
    first = getattr(module, module.tensor_names[0])
    return (dtype, torch.device(device).type, first.data_ptr())


def prepare(module: torch.nn.Module, dtype: torch.dtype, device: str | torch.device = "cpu") -> str:
    """Choose ``module``'s kernel for activations of ``dtype`` on ``device`` and attach it as
    ``module.fast`` (None when no prepared kernel applies); drops the fp32 dequantized cache
    when a kernel is attached. Returns the path name (see :func:`path_name`)."""
    kernel = plan(module.stored_weight(), module.bias, dtype, torch.device(device))
    module.fast = kernel
    module.fast_key = _key(module, dtype, device)
    if kernel is not None:
        module.drop_cache()
    return path_name(module)


def path_name(module: torch.nn.Module) -> str:
    """``int4``, ``int8``, ``dense``, ``spqr-int4``, ... for a prepared kernel; otherwise the
    per-call paths registered for the kind followed by ``reference``."""
    fast = getattr(module, "fast", None)
    if fast is not None:
        return fast.path
    names = [fn.__name__ for fn in _FAST_PATHS.get(module.weight_meta["kind"], [])]
    return "/".join([*names, "reference"])


def linear(module: torch.nn.Module, x: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """``y = x W^T + b`` for a QuantLinear ``module``; ``kernel`` is ``auto`` or ``reference``.

    Args:
        x: ``[..., in_features]``. Returns ``[..., out_features]`` in ``x.dtype``.
    """
    if kernel == "auto":
        if not torch.compiler.is_compiling() and getattr(module, "fast_key", None) != _key(
            module, x.dtype, x.device
        ):
            prepare(module, x.dtype, x.device)
        fast = getattr(module, "fast", None)
        if fast is not None and fast.accepts(x):
            return fast(x)
        for fn in _FAST_PATHS.get(module.weight_meta["kind"], []):
            y = fn(module, x)
            if y is not None:
                return y
    return reference.linear(x, module.dequantized_weight(), module.bias)
