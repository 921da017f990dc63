"""The inputs of a quantization run: the method config of a recipe entry or of command-line
settings, and the calibration data to draw."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowbit.algorithms import config_class
from lowbit.core.config import MethodConfig
from lowbit.engine.placement import resolve_device
from lowbit.errors import LowbitError, user_input


@dataclass(frozen=True)
class CalibSpec:
    """Calibration data: ``nsamples`` random windows of ``seqlen`` tokens of ``corpus``,
    drawn with ``seed`` (see :func:`lowbit.data.calibration.calibration_batch`), run through
    the model ``batch_size`` windows at a time. ``all_experts``: every expert of a
    mixture-of-experts block is calibrated on every token (as llm-compressor's MoE calibration),
    not only on the tokens routed to it; the block's outputs still follow the routing."""

    corpus: str = "austen-emma"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    all_experts: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or (
            self.batch_size < 1
        ):
            raise LowbitError(
                f"calibration batch_size must be an integer >= 1, got {self.batch_size!r}; "
                "use a small positive number of windows per forward pass (default 8)"
            )


def as_device(spec: str | torch.device | None) -> torch.device:
    """The compute device of ``spec`` (``auto``/None: CUDA when available, else the CPU;
    ``cpu``, ``cuda``, ``cuda:N``); a LowbitError for one this machine lacks."""
    with user_input("--device"):
        return resolve_device(spec)


def build_config(method: str, settings: dict[str, Any]) -> MethodConfig:
    """The config of the method named ``method`` from recipe keys / flags (unknown keys are an
    error naming them)."""
    return config_class(method).from_dict({"method": method, **settings})


def as_config(config: MethodConfig | dict[str, Any]) -> MethodConfig:
    """``config`` itself, or the config of a recipe entry ``{"method": name, key: value, ...}``."""
    if isinstance(config, MethodConfig):
        return config
    if not isinstance(config, dict) or not isinstance(config.get("method"), str):
        raise LowbitError(
            "a config is a method config (e.g. GPTQConfig(bits=4)) or a recipe entry "
            f"{{'method': name, ...}}; got {config!r}"
        )
    settings = dict(config)
    return build_config(settings.pop("method"), settings)
