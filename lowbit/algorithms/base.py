"""What every method shares: config (de)serialisation, the per-layer report, the registry.

A method is a frozen config dataclass plus one registered function: ``apply_block(config, ctx)``
quantizes the linears of one decoder block in place (``ctx`` is the engine's
:class:`~lowbit.engine.context.BlockContext`) and returns one :class:`LayerReport` per linear
(optionally followed by ``finish_group`` over groups of blocks, e.g. QLLM's error correction);
or, for methods that transform the whole model at once (end-to-end training),
``apply_model(config, ctx)`` (``ctx``: :class:`~lowbit.engine.model_context.ModelContext`)
returns the reports and a dict of run facts (``QuantizeResult.extra``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lowbit.errors import LowbitError

CONFIG_VERSION = 1


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config: JSON round trip with a version and strict keys."""

    method: ClassVar[str] = ""

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """LowbitError for a setting that the shapes ``(out_features, in_features)`` of the
        model's block linears rule out, before any calibration (a method with a rank checks it
        with :func:`lowbit.algorithms.weight_config.check_rank`); nothing to check here."""

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "version": CONFIG_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise LowbitError(f"config is for method '{method}', not '{cls.method}'")
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise LowbitError(f"config version {version} is not supported (expected 1)")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise LowbitError(
                    f"unknown key '{key}' for method '{cls.method}'; known keys: "
                    f"{', '.join(sorted(known))}"
                )
        hints = typing.get_type_hints(cls)
        return cls(**{k: _typed(cls.method, k, v, hints[k]) for k, v in data.items()})


def _typed(method: str, key: str, value: Any, kind: Any) -> Any:
    """``value`` of setting ``key`` as the field's type ``kind``, or a LowbitError naming the
    key and the type (a recipe's ``bits: four`` or ``ignore: "*.x"`` would otherwise fail deep
    in validation, or silently: a string iterates as one pattern per character)."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-2 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind is str:
        ok = isinstance(value, str)
    elif typing.get_origin(kind) is tuple:
        ok = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = True
    if ok:
        return value
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        kind, "a list of glob patterns, e.g. ['*.mlp.down_proj']"
    )
    flag = "--" + key.replace("_", "-")
    raise LowbitError(f"{key} ({flag}) of method '{method}' must be {want}, got {value!r}")


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


@dataclass(frozen=True)
class Method:
    """A registered method: exactly one of ``apply_block`` (block by block, run by the
    sequential engine) and ``apply_model`` (whole model) is set."""

    name: str
    config_cls: type[MethodConfig]
    apply_block: Callable[..., list[LayerReport]] | None
    summary: str
    apply_model: Callable[..., tuple[list[LayerReport], dict[str, Any]]] | None = None
    finish_group: Callable[..., list[LayerReport]] | None = None
    distributed: bool = False  # runs under torchrun (its block loop uses BlockContext's
    # collect_hessians / solve_layers / max_over_ranks for everything calibration-dependent)

    def group_blocks(self, config: MethodConfig) -> int:
        """Blocks per group: a method with ``finish_group`` gets every group of this many
        consecutive blocks once they are quantized (``config.group_blocks``), others 1."""
        return getattr(config, "group_blocks", 1) if self.finish_group is not None else 1


METHODS: dict[str, Method] = {}


def register(
    name: str,
    config_cls: type[MethodConfig],
    summary: str,
    finish_group: Callable[..., list[LayerReport]] | None = None,
    distributed: bool = False,
) -> Callable:
    """Decorator for a method's ``apply_block`` function: one registry line per method.

    ``finish_group(config, group_ctx, reports)`` (optional) runs after every group of
    ``config.group_blocks`` blocks is quantized (see :class:`~lowbit.engine.context.GroupContext`)
    and returns the group's reports, updated. ``distributed``: the method may run under
    torchrun (see :mod:`lowbit.engine.distributed`).
    """

    def wrap(apply_block: Callable[..., list[LayerReport]]) -> Callable[..., list[LayerReport]]:
        METHODS[name] = Method(
            name, config_cls, apply_block, summary, None, finish_group, distributed
        )
        return apply_block

    return wrap


def register_model(name: str, config_cls: type[MethodConfig], summary: str) -> Callable:
    """Decorator for a whole-model method's ``apply_model`` function (one registry line)."""

    def wrap(apply_model: Callable) -> Callable:
        METHODS[name] = Method(name, config_cls, None, summary, apply_model)
        return apply_model

    return wrap


def get_method(name: str) -> Method:
    from lowbit import algorithms  # noqa: F401  (importing registers every method)

    if name not in METHODS:
        raise LowbitError(f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
