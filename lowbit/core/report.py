"""The per-linear record every method returns: bits, errors, seconds, method-specific extras."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerReport:
    """Per-linear metrics recorded while quantizing.

    ``weight_rel_err`` = ||W - Q||_F / ||W||_F; ``hessian_rel_err`` =
    tr(E H E^T) / tr(W H W^T) with E = W - Q: the relative output error on the calibration data
    (NaN where a method has no Hessian, e.g. trained layers; written as null in JSON).
    """

    name: str
    bits_per_weight: float
    weight_rel_err: float
    hessian_rel_err: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON: non-finite floats become None (JSON has no NaN)."""
        out = dataclasses.asdict(self)
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in out.items()}
