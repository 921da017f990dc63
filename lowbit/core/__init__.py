"""What every method and the engine share, below both: the method config base
(:mod:`~lowbit.core.config`), the method interface and its registry keyed by config class
(:mod:`~lowbit.core.method`), the per-layer report (:mod:`~lowbit.core.report`) and running one
decoder block (:mod:`~lowbit.core.block_output`)."""

from lowbit.core.config import CONFIG_VERSION, MethodConfig, option
from lowbit.core.method import (
    Method,
    method_for,
    method_named,
    register,
    register_model,
    registered,
)
from lowbit.core.report import LayerReport

__all__ = [
    "CONFIG_VERSION",
    "LayerReport",
    "Method",
    "MethodConfig",
    "method_for",
    "method_named",
    "option",
    "register",
    "register_model",
    "registered",
]
