"""QuantLinear: a linear layer whose weight is stored quantized (packed codes, not floats)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.codecs import StoredWeight, stored_weight_from
from lowbit.kernels import cpu_paths as _cpu_paths  # noqa: F401  (registers the CPU planners)
from lowbit.kernels import dispatch
from lowbit.kernels import gpu_paths as _gpu_paths  # noqa: F401  (registers the CUDA planners)
from lowbit.nn.act_quant import ActQuantizer
from lowbit.nn.lowrank import LowRank
from lowbit.nn.reassembly import ChannelReassembly

REASSEMBLY_BUFFERS = ("first", "second", "divisor")


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as a stored low-bit weight.

    The stored weight's tensors are buffers (so they are what ``state_dict`` saves). The matmul
    is chosen by :mod:`lowbit.kernels.dispatch` (registered planners, one mechanism): in kernel
    mode ``auto`` a *prepared kernel* (int4/int8 ops on repacked codes, a weight dequantized
    once into the activation dtype, SpQR's tiled fp32 path, a Triton or FP8 GPU kernel) is
    attached at load time or on the first call with a new activation dtype/device; otherwise,
    or when none applies, the reference path caches the dequantized fp32 weight
    ``[out_features, in_features]`` (drop it with :meth:`drop_cache`).

    Run-time state, declared in ``__init__``, written only by this class's methods (which the
    dispatcher and the algorithms call) and never saved: the kernel mode
    (:meth:`set_kernel_mode`), the prepared kernel and the key it was planned for
    (:meth:`attach_kernel`), the reference cache, and QLLM's calibration weight
    (:meth:`keep_calibration_weight`).

    Optional add-ons (submodules, saved with the layer): ``act_quant`` quantizes the input
    before the matmul (W4A8, W8A8); ``lowrank`` adds ``(x V^T) U^T`` computed from the
    unquantized input (LoRC). With both: ``y = Q(x) W^T + (x V^T) U^T + b``. ``reassembly``
    (QLLM) first maps the input's ``C`` channels to the stored weight's ``C'`` columns
    (``x -> R(x)``, applied before the other add-ons); ``in_features`` is then ``C``.
    """

    # run-time state (see __init__); none of it is in state_dict
    kernel: str
    fast: dispatch.Kernel | None
    fast_key: tuple | None
    calibration_weight: torch.Tensor | None
    _dequantized: torch.Tensor | None

    def __init__(
        self,
        weight: StoredWeight,
        bias: torch.Tensor | None = None,
        act_quant: ActQuantizer | None = None,
        lowrank: LowRank | None = None,
        reassembly: ChannelReassembly | None = None,
    ) -> None:
        super().__init__()
        if reassembly is not None and reassembly.out_features != weight.in_features:
            raise ValueError(
                f"reassembly gives {reassembly.out_features} channels, the weight has "
                f"{weight.in_features} columns"
            )
        self.in_features = weight.in_features if reassembly is None else reassembly.in_features
        self.out_features = weight.out_features
        self.weight_meta = weight.meta()
        self.tensor_names = tuple(weight.tensors())
        for name, tensor in weight.tensors().items():
            self.register_buffer(name, tensor)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # run-time state, never saved:
        # kernel mode: "auto" (the prepared kernel when it accepts the input) or "reference"
        # (always dequantize-and-matmul)
        self.kernel = "auto"
        # the prepared kernel (a submodule with non-persistent buffers), or None: the reference
        self.register_module("fast", None)
        # (activation dtype, device type, address of the first stored tensor) ``fast`` was
        # planned for; None until planned. A different key re-plans (outside torch.compile).
        self.fast_key = None
        # fp32 [out_features, C']: the reference path's dequantized weight, built on first use
        self._dequantized = None
        # fp32 [out_features, C']: QLLM's unrounded weight, which its error correction merges
        # its low-rank update into and re-quantizes; None when absent
        self.calibration_weight = None
        self.act_quant = act_quant
        self.lowrank = lowrank
        self.reassembly = reassembly
        if lowrank is not None and (lowrank.u.shape[0], lowrank.v.shape[1]) != (
            self.out_features,
            weight.in_features,
        ):
            raise ValueError("low-rank factors do not match the layer's shape")

    @classmethod
    def from_stored(
        cls, layer: dict, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None
    ) -> QuantLinear:
        """Rebuild a layer from its manifest entry (``weight`` meta, optional ``act_quant`` and
        ``lowrank`` metas) and its saved tensors (names relative to the layer)."""
        tensors = dict(tensors)
        act = lowrank = reassembly = None
        if "reassembly" in layer:
            parts = [tensors.pop(f"reassembly.{k}") for k in REASSEMBLY_BUFFERS]
            reassembly = ChannelReassembly(*parts, layer["reassembly"]["in_features"])
        if "lowrank" in layer:
            lowrank = LowRank(tensors.pop("lowrank.u"), tensors.pop("lowrank.v"))
        if "act_quant" in layer:
            act = ActQuantizer.from_meta(layer["act_quant"], tensors.pop("act_quant.scale", None))
        return cls(stored_weight_from(layer["weight"], tensors), bias, act, lowrank, reassembly)

    def addon_meta(self) -> dict:
        """Manifest entries of the add-ons present (none for a plain quantized linear)."""
        out = {}
        if self.act_quant is not None:
            out["act_quant"] = self.act_quant.meta()
        if self.lowrank is not None:
            out["lowrank"] = self.lowrank.meta()
        if self.reassembly is not None:
            out["reassembly"] = self.reassembly.meta()
        return out

    def stored_weight(self) -> StoredWeight:
        return stored_weight_from(
            self.weight_meta, {name: getattr(self, name) for name in self.tensor_names}
        )

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 ``[out_features, C']``: exactly the stored weight's values (``C'`` =
        ``in_features`` unless a reassembly maps the input first)."""
        if self._dequantized is None:
            self._dequantized = self.stored_weight().dequantize()
        return self._dequantized

    def effective_weight(self) -> torch.Tensor:
        """fp32 ``[out_features, C']``: the stored weight plus the low-rank add-on."""
        w = self.dequantized_weight()
        return w if self.lowrank is None else w + self.lowrank.weight()

    def drop_cache(self) -> None:
        self._dequantized = None

    def set_kernel_mode(self, mode: str) -> None:
        """``auto`` (the prepared kernel where it applies) or ``reference`` (always
        dequantize-and-matmul, the oracle)."""
        if mode not in dispatch.MODES:
            raise ValueError(f"kernel mode must be one of {dispatch.MODES}, got {mode!r}")
        self.kernel = mode

    def attach_kernel(self, kernel: dispatch.Kernel | None, key: tuple) -> None:
        """Keep ``kernel`` (None: the reference) as planned for ``key`` (see
        :func:`lowbit.kernels.dispatch.prepare`); drops the fp32 dequantized cache when the
        kernel replaces it."""
        self.fast = kernel
        self.fast_key = key
        if kernel is not None and kernel.frees_reference_cache:
            self.drop_cache()

    def keep_calibration_weight(self, weight: torch.Tensor) -> None:
        """Keep fp32 ``weight`` ``[out_features, C']`` (not saved) for a later calibration
        step: QLLM's error correction merges into it."""
        self.calibration_weight = weight

    def bits_per_weight(self) -> float:
        """Stored bits per weight of the ``out_features x in_features`` layer: the stored weight,
        plus low-rank factors, a static activation scale and reassembly indices when present
        (every saved tensor but the bias)."""
        stored = self.stored_weight()
        own = stored.bits_per_weight() * stored.in_features / self.in_features
        extra = 0 if self.reassembly is None else self.reassembly.stored_bits()
        if self.lowrank is not None:
            extra += self.lowrank.stored_bits()
        if self.act_quant is not None and self.act_quant.scale is not None:
            extra += self.act_quant.scale.numel() * self.act_quant.scale.element_size() * 8
        return own + extra / (self.in_features * self.out_features) if extra else own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reassembly is not None:
            x = self.reassembly(x)
        y = dispatch.linear(self, x)  # quantizes x first when the layer has act_quant
        if self.lowrank is not None:
            y = y + self.lowrank(x).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kind={self.weight_meta['kind']}, bits/weight={self.bits_per_weight():.3f}"
        )
