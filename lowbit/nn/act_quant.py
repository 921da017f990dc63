"""Activation fake-quantization: a linear layer's input rounded to INT8 / FP8 before the matmul.

``x_q = s * E.round(x / s)`` with ``E`` an element format of :mod:`lowbit.formats` (``int8``,
``fp8_e4m3``, ``fp8_e5m2``, ...; round to nearest even, saturating) and a symmetric scale ``s``:

* ``"token"``: dynamic, one fp32 scale per token (row of ``x``), ``s = amax(|x_t|) / E.max``
  (an all-zero token gets ``s = 1``);
* ``"tensor"``: static, one fp32 scale calibrated beforehand from the absolute maximum of the
  layer's inputs over the calibration data, ``s = absmax / E.max`` (stored as a buffer).

Integer formats may also be *asymmetric* per token (QLLM, SmoothQuant baselines): codes
``q = clamp(round(x / s) + z, 0, 2^b - 1)`` with ``s = (max_t - min_t) / (2^b - 1)`` over the
token's range widened to contain 0, ``z = round(-min_t / s)``, and ``x_q = s (q - z)``.

On CPU this is *simulated*: the rounded values are held in the input's float dtype and the
matmul runs in floating point; the values are exactly what an FP8/INT8 kernel multiplies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lowbit.formats.element import get_format
from lowbit.formats.spec import ACT_GRANULARITIES, ActSpec, check_act_format

GRANULARITIES = ACT_GRANULARITIES
# torch's own casts give the formats layer's round bit for bit once clamped (docs/FORMATS.md)
TORCH_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
SIMULATED = "simulated (values rounded to the format, matmul in floating point)"


def token_scales(x: torch.Tensor, fmt_max: float) -> torch.Tensor:
    """fp32 ``[..., 1]`` per-token scales ``amax(|x|, -1) / fmt_max`` (1 for all-zero tokens)."""
    amax = x.detach().float().abs().amax(dim=-1, keepdim=True)
    return torch.where(amax > 0, amax / fmt_max, torch.ones_like(amax))


def asymmetric_token_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` ``[..., C]`` rounded to a ``bits``-bit asymmetric grid per token (module doc);
    returned in ``x.dtype``. An all-zero token stays zero."""
    xf = x.float()
    maxq = (1 << bits) - 1
    lo = xf.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = xf.amax(dim=-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / maxq
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = (-lo / s).round()
    return ((torch.clamp(torch.round(xf / s) + z, 0, maxq) - z) * s).to(x.dtype)


class ActQuantizer(nn.Module):
    """Fake-quantizes a linear layer's input ``[..., in_features]`` (see the module docstring).

    Args:
        fmt: element format name. granularity: ``"token"`` or ``"tensor"``.
        scale: ``"tensor"`` only: the fp32 scale ``[1]`` (see :meth:`static`).
    """

    def __init__(
        self,
        fmt: str,
        granularity: str = "token",
        scale: torch.Tensor | None = None,
        symmetric: bool = True,
    ) -> None:
        super().__init__()
        check_act_format(fmt)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity '{granularity}' unknown; known: {GRANULARITIES}")
        if (granularity == "tensor") != (scale is not None):
            raise ValueError("a scale is given exactly for granularity 'tensor'")
        if not symmetric and (not fmt.startswith("int") or granularity != "token"):
            raise ValueError(
                f"asymmetric activations are per-token integer formats, not {fmt} "
                f"per-{granularity}"
            )
        self.fmt, self.granularity, self.symmetric = fmt, granularity, symmetric
        self.format = get_format(fmt)
        self.register_buffer("scale", None if scale is None else scale.float().reshape(1).clone())

    @classmethod
    def from_spec(cls, spec: ActSpec, absmax: float | None = None) -> ActQuantizer:
        """The quantizer of a quantized :class:`~lowbit.formats.spec.ActSpec`; a ``"tensor"``
        spec takes its static scale from ``absmax``, the calibration inputs' max |x|."""
        if not spec.quantized:
            raise ValueError("activations that are not quantized have no quantizer")
        if spec.granularity == "tensor":
            if absmax is None:
                raise ValueError("a per-tensor activation quantizer needs the calibrated absmax")
            return cls.static(spec.format, absmax)
        return cls(spec.format, spec.granularity, symmetric=spec.symmetric)

    @property
    def spec(self) -> ActSpec:
        """What this quantizer rounds to, as an :class:`~lowbit.formats.spec.ActSpec`."""
        return ActSpec(self.fmt, self.granularity, self.symmetric)

    @classmethod
    def static(cls, fmt: str, absmax: float) -> ActQuantizer:
        """Per-tensor quantizer from the calibrated absolute maximum of the inputs."""
        e_max = get_format(fmt).max
        return cls(fmt, "tensor", torch.tensor([absmax / e_max if absmax > 0 else 1.0]))

    def scales(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 scales broadcastable to ``x``: ``[..., 1]`` (token) or ``[1]`` (tensor)."""
        if self.scale is not None:  # built on the CPU by a method, until its block moves
            return self.scale.float().to(x.device)
        return token_scales(x, self.format.max)

    def round(self, y: torch.Tensor) -> torch.Tensor:
        """fp32 ``E.round(y)`` (saturating); torch's FP8 casts where they exist (faster)."""
        dtype = TORCH_FP8.get(self.fmt)
        if dtype is None:
            return self.format.round(y)
        limit = self.format.max
        return y.clamp(-limit, limit).to(dtype).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.symmetric:
            return asymmetric_token_quant(x, self.format.bits)
        s = self.scales(x)
        return (self.round(x.float() / s) * s).to(x.dtype)

    def meta(self) -> dict:
        out = {"format": self.fmt, "granularity": self.granularity, "execution_cpu": SIMULATED}
        return out if self.symmetric else {**out, "symmetric": False}

    @classmethod
    def from_meta(cls, meta: dict, scale: torch.Tensor | None) -> ActQuantizer:
        """Rebuild from :meth:`meta` and the stored ``scale`` buffer (exactly, no recompute)."""
        return cls(meta["format"], meta["granularity"], scale, meta.get("symmetric", True))

    def describe(self) -> str:
        kind = "" if self.symmetric else " asymmetric"
        return f"{self.fmt}{kind} per-{self.granularity}"

    def extra_repr(self) -> str:
        return self.describe()


@contextmanager
def observe_absmax(modules: dict[str, nn.Module]) -> Iterator[dict[str, float]]:
    """While open, record ``max |x|`` of every input the named modules receive (static range
    calibration).

    Yields a dict ``name -> absmax`` (0.0 until the module runs), filled in as the modules run.
    The forward pre-hooks run before hooks registered later, so they see the input even when a
    later hook stops the forward (as the engine's Hessian collection does).
    """
    amax = dict.fromkeys(modules, 0.0)

    def hook(name: str, x: torch.Tensor) -> None:
        amax[name] = max(amax[name], float(x.detach().abs().max()))

    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=n: hook(name, args[0]))
        for n, m in modules.items()
    ]
    try:
        yield amax
    finally:
        for h in handles:
            h.remove()
