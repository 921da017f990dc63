"""The method interface and its registry, keyed by config class.

A method is a frozen config class (:class:`~lowbit.core.config.MethodConfig`, naming the method
once in ``method``) plus one registered function. Block by block: ``apply_block(config, ctx)``
quantizes the linears of one decoder block in place (``ctx``: the engine's
:class:`~lowbit.engine.context.BlockContext`) and returns one
:class:`~lowbit.core.report.LayerReport` per linear, optionally followed by
``finish_group(config, group_ctx, reports)`` over every ``config.blocks_per_group()``
consecutive blocks (QLLM's error correction). Whole model (end-to-end training):
``apply_model(config, ctx)`` (``ctx``: :class:`~lowbit.engine.model_context.ModelContext`)
returns the reports and a dict of run facts.

As torchao's ``quantize_(model, config)``, the implementation is found from ``type(config)``
(:func:`method_for`); names (:func:`method_named`) are for recipes and the command line
(:mod:`lowbit.algorithms` imports the built-in methods, registering them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lowbit.core.config import MethodConfig
from lowbit.core.report import LayerReport
from lowbit.errors import LowbitError

BlockFn = Callable[..., list[LayerReport]]
ModelFn = Callable[..., tuple[list[LayerReport], dict[str, Any]]]


@dataclass(frozen=True)
class Method:
    """A registered method: exactly one of ``apply_block`` (block by block, run by the
    sequential engine) and ``apply_model`` (whole model) is set.

    ``distributed``: the method may run under torchrun (its block loop uses BlockContext's
    collect_hessians / solve_layers / max_over_ranks for everything calibration-dependent).
    ``calibrated``: whether ``apply_block`` reads calibration activations, for a given config
    (:meth:`needs_calibration`); a run that does not (RTN) gets blocks with no calibration
    inputs, and no calibration forward is run for it.
    """

    config_cls: type[MethodConfig]
    summary: str
    apply_block: BlockFn | None = None
    apply_model: ModelFn | None = None
    finish_group: BlockFn | None = None
    distributed: bool = False
    calibrated: bool | Callable[[MethodConfig], bool] = True

    def needs_calibration(self, config: MethodConfig) -> bool:
        """Whether ``apply_block`` reads calibration activations under ``config``."""
        return self.calibrated(config) if callable(self.calibrated) else self.calibrated

    @property
    def name(self) -> str:
        return self.config_cls.method

    def group_blocks(self, config: MethodConfig) -> int:
        """Blocks per group: ``config.blocks_per_group()`` for a method with ``finish_group``,
        else 1."""
        return config.blocks_per_group() if self.finish_group is not None else 1


METHODS: dict[type[MethodConfig], Method] = {}


def _add(method: Method) -> None:
    cls = method.config_cls
    if not cls.method:
        raise TypeError(f"{cls.__name__} sets no method name (method = '...')")
    clash = [m for m in METHODS.values() if m.name == cls.method and m.config_cls is not cls]
    if clash:
        raise TypeError(f"method name '{cls.method}' is taken by {clash[0].config_cls.__name__}")
    METHODS[cls] = method


def register(
    config_cls: type[MethodConfig],
    summary: str,
    finish_group: BlockFn | None = None,
    distributed: bool = False,
    calibrated: bool | Callable[[MethodConfig], bool] = True,
) -> Callable[[BlockFn], BlockFn]:
    """Decorator registering a block-wise method's ``apply_block`` for ``config_cls``.

    ``finish_group(config, group_ctx, reports)`` (optional) runs after every group of
    ``config.blocks_per_group()`` blocks is quantized (see
    :class:`~lowbit.engine.context.GroupContext`) and returns the group's reports, updated.
    ``calibrated``: ``False``, or a function of the config that says ``False``, when
    ``apply_block`` reads no calibration activations (see :class:`Method`).
    """

    def wrap(apply_block: BlockFn) -> BlockFn:
        _add(Method(config_cls, summary, apply_block, None, finish_group, distributed,
                    calibrated))
        return apply_block

    return wrap


def register_model(config_cls: type[MethodConfig], summary: str) -> Callable[[ModelFn], ModelFn]:
    """Decorator registering a whole-model method's ``apply_model`` for ``config_cls``."""

    def wrap(apply_model: ModelFn) -> ModelFn:
        _add(Method(config_cls, summary, apply_model=apply_model))
        return apply_model

    return wrap


def registered() -> dict[str, Method]:
    """Every method registered so far, by name (:func:`lowbit.algorithms.methods` imports the
    built-in ones first)."""
    return {m.name: m for m in METHODS.values()}


def method_for(config: MethodConfig) -> Method:
    """The method registered for ``type(config)`` (a config's class is defined next to its
    registered function, so having a config means its method is registered)."""
    found = METHODS.get(type(config))
    if found is None:
        raise LowbitError(
            f"no method is registered for {type(config).__name__}; register its apply "
            "function with @register(ConfigClass, summary)"
        )
    return found


def method_named(name: str) -> Method:
    """The registered method a recipe or the command line names, or a LowbitError listing
    them."""
    known = registered()
    if name not in known:
        raise LowbitError(f"unknown method '{name}'; available: {', '.join(sorted(known))}")
    return known[name]
