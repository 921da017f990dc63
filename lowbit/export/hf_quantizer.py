"""transformers integration: ``AutoModelForCausalLM.from_pretrained(lowbit_DIR)`` builds the
model with lowbit's :class:`~lowbit.nn.quant_linear.QuantLinear` layers, exactly as
:func:`~lowbit.export.lowbit_format.load_quantized` does.

A lowbit DIR's ``config.json`` says ``quantization_config.quant_method = "lowbit"``;
:func:`register` adds that method to transformers' quantizer registry
(``transformers.quantizers.auto.register_quantization_config`` / ``register_quantizer``).
``import lowbit`` does not import this module: :mod:`lowbit._hf_hook` calls :func:`register`
when (and only when) transformers loads its quantizer registry, so ``import lowbit`` stays
cheap. Loading only (inference): the model cannot be re-saved through transformers, use
:func:`lowbit.api.save_quantized`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowbit.errors import LowbitError

METHOD = "lowbit"


class LowbitConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config`` of a lowbit DIR (informational: the layer
    formats are in ``lowbit.json``)."""

    def __init__(
        self,
        format_version: int = 1,
        method: str | None = None,
        avg_bits: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = METHOD
        self.format_version = format_version
        self.method = method
        self.avg_bits = avg_bits

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": METHOD, "format_version": self.format_version,
                "method": self.method, "avg_bits": self.avg_bits}


class LowbitHfQuantizer(HfQuantizer):
    """Replaces every linear listed in the DIR's ``lowbit.json`` by a QuantLinear holding the
    stored tensors before transformers loads the remaining (float) weights."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from lowbit.export.lowbit_format import WEIGHTS, read_manifest
        from lowbit.models.arch import set_submodule
        from lowbit.nn.quant_linear import QuantLinear

        if not checkpoint_files:
            raise LowbitError("a lowbit DIR loads from its local folder; no checkpoint files "
                              "were given to the lowbit quantizer")
        path = Path(checkpoint_files[0]).parent
        manifest = read_manifest(path)
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            keys = list(f.keys())  # noqa: SIM118
            for name, layer in manifest["layers"].items():
                prefix = f"{name}."
                own = {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
                bias = own.pop("bias", None)
                set_submodule(model, name, QuantLinear.from_stored(layer, own, bias))
        self.modules_to_not_convert = []
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Add ``lowbit`` to transformers' quantization registries (idempotent)."""
    from transformers.quantizers import auto

    if METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(METHOD)(LowbitConfig)
    if METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(METHOD)(LowbitHfQuantizer)
