"""What weight-activation methods share (QLLM, SmoothQuant, the RTN W/A baseline): the
weight and activation settings, the quantized linear they install, and the per-block
observation points at which a candidate's error is measured.

Quantizers as in QLLM's paper: weights per output channel, asymmetric min-max (RTN); activations
per token, dynamic, asymmetric (:func:`~lowbit.nn.act_quant.asymmetric_token_quant`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.algorithms.weight_config import IntWeightConfig
from lowbit.core.block_output import StopBlock, block_output
from lowbit.core.config import option, with_default
from lowbit.errors import LowbitError
from lowbit.formats.intq import rtn_quantize
from lowbit.formats.packed_int import PackedIntWeight
from lowbit.formats.spec import ActSpec
from lowbit.nn.act_quant import ActQuantizer
from lowbit.nn.quant_linear import QuantLinear
from lowbit.nn.reassembly import ChannelReassembly


@dataclass(frozen=True)
class WAConfig(IntWeightConfig):
    """Integer weights and activations: the weights as :class:`IntWeightConfig` (per output
    channel, asymmetric by default), the activations per-token integers of ``abits``
    (:attr:`act_spec`; 16 = not quantized)."""

    group_size: int = with_default(IntWeightConfig, "group_size", -1)
    symmetric: bool = with_default(IntWeightConfig, "symmetric", False)
    abits: int = option(4, "activation bits, 2..8 (per-token integer), or 16 (activations not "
                           "quantized)")
    act_symmetric: bool = option(False, "symmetric activation grid (default: asymmetric, as "
                                        "QLLM)")
    search_windows: int = option(4, "calibration windows on which candidates (thresholds, "
                                    "smoothing) are compared against the full-precision block")
    sample_tokens: int = option(2048, "input tokens kept per linear group for statistics that "
                                      "need samples")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.act_spec  # noqa: B018  (validates abits)
        if self.search_windows < 1 or self.sample_tokens < 1:
            raise LowbitError("search_windows and sample_tokens must be >= 1")

    @property
    def act_spec(self) -> ActSpec:
        """``int{abits}`` per token (``act_symmetric``), or not quantized for 16."""
        return ActSpec.integer(self.abits, "token", self.act_symmetric)

    def act_quantizer(self) -> ActQuantizer | None:
        spec = self.act_spec
        return ActQuantizer.from_spec(spec) if spec.quantized else None


def quantized_linear(
    config: WAConfig,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    reassembly: ChannelReassembly | None = None,
) -> QuantLinear:
    """``weight`` ``[R, C']`` rounded to nearest on ``config``'s grid, with activation
    quantization and the optional input reassembly."""
    grid = config.grid
    codes, scales, zeros = rtn_quantize(weight.detach().float(), grid)
    stored = PackedIntWeight.from_codes(codes, scales, zeros, grid)
    return QuantLinear(stored, bias, config.act_quantizer(), reassembly=reassembly)


def search_windows(hidden: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """The first ``count`` calibration windows of ``hidden`` (batches ``[b, L, H]``)."""
    out, taken = [], 0
    for x in hidden:
        if taken >= count:
            break
        part = x[: count - taken]
        out.append(part)
        taken += part.shape[0]
    return out


class ObservationPoints:
    """Full-precision values at each sequential group's observation point (the next group's
    input, or the last group's own output), on the search windows.

    ``error(ctx, windows, i)`` is the mean squared difference at group ``i``'s point between the
    block as it is now (candidates installed) and the full-precision values. Where the group and
    its point lie in one submodule that takes a single tensor (the MLP), candidates run only
    that submodule, on its inputs captured once per group; attention needs the block's call
    arguments (positions, masks), so q/k/v candidates run the block up to the point.
    """

    def __init__(self, ctx, windows: list[torch.Tensor]) -> None:
        groups = ctx.table.sequential
        self.points = [_point(ctx, groups, i) for i in range(len(groups))]
        self.values: list[list[torch.Tensor]] = [[] for _ in groups]
        self.local = [_local_module(groups, self.points, i) for i in range(len(groups))]
        self._local_inputs: dict[int, list[torch.Tensor]] = {}
        hooks = [self._hook(ctx, i, self.values[i]) for i in range(len(groups))]
        try:
            with torch.no_grad():
                for x in windows:
                    block_output(ctx.block, x, ctx.inputs.call_for(ctx.index, x))
        finally:
            for h in hooks:
                h.remove()

    def _hook(self, ctx, i: int, sink: list, stop: bool = False):
        name, after = self.points[i]

        def keep(value: torch.Tensor) -> None:
            sink.append(value.detach().float())
            if stop:
                raise StopBlock

        module = ctx.module(name)
        if after:
            return module.register_forward_hook(lambda _m, _a, out: keep(out))
        return module.register_forward_pre_hook(lambda _m, args: keep(args[0]))

    @torch.no_grad()
    def error(self, ctx, windows: list[torch.Tensor], i: int) -> float:
        got: list[torch.Tensor] = []
        local = self.local[i]
        if local is not None and i not in self._local_inputs:
            self._local_inputs[i] = _capture_input(ctx, local, windows)
        hook = self._hook(ctx, i, got, stop=True)
        try:
            if local is None:
                for x in windows:
                    _run_until_stopped(ctx.block, x, ctx.inputs.call_for(ctx.index, x))
            else:
                for x in self._local_inputs[i]:
                    _run_until_stopped(ctx.module(local), x, ((), {}))
        finally:
            hook.remove()
        total = sum(float(((a - b) ** 2).sum()) for a, b in zip(got, self.values[i], strict=True))
        return total / sum(v.numel() for v in self.values[i])


@dataclass
class InputStats:
    """A linear's input over the calibration set: ``absmax`` ``[C]`` per-channel ``max|x|``,
    ``sample`` ``[T, C]`` its first tokens, ``amax`` the overall maximum."""

    absmax: torch.Tensor
    sample: torch.Tensor
    amax: float


def input_stats(ctx, name: str, sample_tokens: int) -> InputStats:
    """Per-channel ``max|x|`` of linear ``name``'s input over all calibration inputs."""
    absmax = torch.zeros(ctx.module(name).in_features, device=ctx.device)
    rows: list[torch.Tensor] = []

    def observe(_m, args) -> None:
        x = args[0].detach().float().reshape(-1, absmax.numel())
        absmax.copy_(torch.maximum(absmax, x.abs().amax(dim=0)))
        taken = sum(r.shape[0] for r in rows)
        if taken < sample_tokens:
            rows.append(x[: sample_tokens - taken].clone())
        raise StopBlock

    _run_with_pre_hook(ctx, name, observe, ctx.hidden)
    return InputStats(absmax, torch.cat(rows), float(absmax.max()))


def _run_with_pre_hook(ctx, name: str, hook, windows: list[torch.Tensor]) -> None:
    """Run the block on each of ``windows`` with ``hook`` on submodule ``name``'s input; the
    hook raises :class:`StopBlock` once it has what it needs."""
    handle = ctx.module(name).register_forward_pre_hook(hook)
    try:
        for x in windows:
            x = ctx.on_device(x)
            _run_until_stopped(ctx.block, x, ctx.inputs.call_for(ctx.index, x))
    finally:
        handle.remove()


def _run_until_stopped(module: torch.nn.Module, x: torch.Tensor, call: tuple) -> None:
    try:
        block_output(module, x, call)
    except StopBlock:
        pass


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _local_module(groups, points, i: int) -> str | None:
    """The submodule that holds group ``i`` and its observation point, if it can run alone
    (not the attention, which holds the first group)."""
    parent = _parent(groups[i][0])
    if not parent or parent == _parent(groups[0][0]) or _parent(points[i][0]) != parent:
        return None
    return parent


def _capture_input(ctx, name: str, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs submodule ``name`` receives when the block runs on ``windows``."""
    seen: list[torch.Tensor] = []

    def keep(_m, args) -> None:
        seen.append(args[0].detach())
        raise StopBlock

    _run_with_pre_hook(ctx, name, keep, windows)
    return seen


def _point(ctx, groups, i: int) -> tuple[str, bool]:
    """(linear name, after) of group ``i``'s observation point: the input of the next group's
    first linear, or the output of the last group's first linear."""
    if i + 1 < len(groups):
        return groups[i + 1][0], False
    return groups[i][0], True
