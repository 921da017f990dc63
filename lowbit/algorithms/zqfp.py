"""ZeroQuant-FP (Wu, Yao, He 2023): floating-point W4A8 / W8A8 with GPTQ weights, M1/M2 scale
constraints and LoRC.

Per linear of a block: GPTQ quantizes the weight onto the chosen grid (FP4/FP8 elements with
group scales, block-scaled and packed as :class:`~lowbit.formats.packed_block.PackedBlockWeight`,
or GPTQ's integer grid as :class:`~lowbit.formats.packed_int.PackedIntWeight`); the layer's input
is then quantized at run time to INT8/FP8 (per token, or per tensor with a scale calibrated from
the absmax seen in this same pass); optionally LoRC adds a rank-m SVD of the weight error.

Scale constraints make an FP4 weight castable to FP8 by an exponent shift (the Hopper FP8 path in
:mod:`lowbit.kernels.fp8_gpu`): ``m1`` rounds every group scale up to a power of two (E8M0),
``m2`` keeps one fp16 scale per output channel and power-of-two ratios per group.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import torch

from lowbit.algorithms.gptq import GPTQConfig, gptq_quantize_blocks, gptq_solve
from lowbit.algorithms.linearwise import Solution, relative_errors, timed_solve
from lowbit.algorithms.lorc import lorc
from lowbit.algorithms.weight_config import check_rank
from lowbit.core.config import option, with_default
from lowbit.core.method import register
from lowbit.core.report import LayerReport
from lowbit.errors import LowbitError
from lowbit.formats.blockscale import BlockScaledConfig
from lowbit.formats.fp import FloatFormat
from lowbit.formats.granularity import Group, parse_group_size
from lowbit.formats.packed_block import PackedBlockWeight
from lowbit.formats.spec import (
    ACT_GRANULARITIES,
    ActSpec,
    WeightSpec,
    act_format_names,
    check_act_granularity,
    weight_format,
    weight_format_names,
)
from lowbit.nn.act_quant import ActQuantizer, observe_absmax
from lowbit.nn.quant_linear import QuantLinear

SCALE_CONSTRAINTS = {"none": ("amax", "fp16"), "m1": ("m1", "e8m0"), "m2": ("m2", "fp16")}


@dataclass(frozen=True)
class ZQFPConfig(GPTQConfig):
    """ZeroQuant-FP settings: GPTQ (all of :class:`GPTQConfig`'s fields) onto an FP or INT weight
    grid, plus activation quantization and LoRC.

    ``bits`` and ``abits`` stay as given: 0 (the default) means "the width of the format", and
    what counts is :attr:`weight_spec` / :attr:`act_spec` (``weight_spec.bits``,
    ``act_spec.bits``); an explicit value that contradicts the format is an error.
    ``static_groups`` defaults to on here: with act-order, block-scaled FP weights need it (they
    store no column permutation); turn act-order off for dynamic groups.
    """

    method = "zqfp"
    bits: int = option(0, "weight bits: 0 = the width of --weight-format (a contradicting "
                          "value is an error)")
    static_groups: bool = with_default(GPTQConfig, "static_groups", True)
    weight_format: str = option(
        "fp4_e2m1",
        "fp4_e2m1 or fp8_e4m3 (FP elements with group scales, GPTQ onto the FP grid) or int4, "
        "int8 (GPTQ's integer grid); any signed format of the formats layer",
        choices=weight_format_names(),
    )
    act_format: str = option(
        "fp8_e4m3",
        "format of every quantized linear's input: fp8_e4m3, fp8_e5m2, int8, or none (weights "
        "only). Simulated on CPU",
        choices=(*act_format_names(), "none"),
    )
    act_granularity: str = option(
        "token",
        "token (dynamic scale per token) or tensor (static scale from the absmax of the "
        "calibration inputs)",
        choices=ACT_GRANULARITIES,
    )
    abits: int = option(0, "activation bits: 0 = from --act-format (16 for none); a "
                           "contradicting value is an error")
    scale_constraint: str = option(
        "none",
        "none (fp16 group scales), m1 (each group scale a power of two, E8M0) or m2 (fp16 scale "
        "per output channel times power-of-two group ratios); FP weights",
        choices=tuple(SCALE_CONSTRAINTS),
    )
    lorc_rank: int = option(0, "rank of the LoRC compensation (SVD of the weight error, fp16 "
                               "factors added in the forward and counted in the bits); 0 = off")

    def __post_init__(self) -> None:
        if self.scale_constraint not in SCALE_CONSTRAINTS:
            raise LowbitError(
                f"scale constraint '{self.scale_constraint}' unknown; known: "
                f"{', '.join(SCALE_CONSTRAINTS)}"
            )
        super().__post_init__()  # the weight spec and the solver
        spec = self.weight_spec
        _check_given("bits", self.bits, spec.bits, f"weight format {self.weight_format}")
        check_act_granularity(self.act_granularity)
        act = self.act_spec
        _check_given("abits", self.abits, act.bits, f"activation format {self.act_format}")
        self._check_choices(spec)

    @property
    def weight_spec(self) -> WeightSpec:
        """``weight_format`` on the granularity of ``group_size``/``ragged_groups``, with the
        scale format of ``scale_constraint`` (fp16 for integer weights)."""
        fmt = weight_format(self.weight_format)
        scale_format = "fp16"
        if isinstance(fmt, FloatFormat):
            scale_format = SCALE_CONSTRAINTS[self.scale_constraint][1]
        granularity = parse_group_size(self.group_size, self.ragged_groups)
        return WeightSpec(self.weight_format, granularity, self.symmetric, scale_format)

    @property
    def act_spec(self) -> ActSpec:
        """``act_format`` per ``act_granularity``; none = not quantized."""
        if self.act_format == "none":
            return ActSpec.none()
        return ActSpec(self.act_format, self.act_granularity)

    def _check_choices(self, spec: WeightSpec) -> None:
        if self.lorc_rank < 0:
            raise LowbitError(f"lorc_rank must be >= 0 (0 = off), got {self.lorc_rank}")
        if not spec.is_float:
            if self.scale_constraint != "none":
                raise LowbitError(
                    f"scale constraint {self.scale_constraint} applies to FP "
                    f"weight formats, not {self.weight_format}; use none"
                )
            return
        if self.scale_constraint == "m2" and not isinstance(spec.granularity, Group):
            raise LowbitError(
                "scale constraint m2 needs groups (per-channel scale x per-group "
                "ratios): set --group-size, or use m1 per channel"
            )
        if self.act_order and not self.static_groups:
            raise LowbitError(
                "FP weights store no column permutation: with act-order keep "
                "--static-groups, or use --no-act-order for dynamic groups"
            )

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """LoRC's rank must exist for every quantized linear: at most min(rows, columns)."""
        super().check_shapes(shapes)
        if self.lorc_rank:
            check_rank(self, "--lorc-rank", self.lorc_rank, shapes)

    @property
    def block_config(self) -> BlockScaledConfig | None:
        """The block-scaled format of FP weights (``None`` for integer weights)."""
        spec = self.weight_spec
        if not spec.is_float:
            return None
        return BlockScaledConfig.from_spec(spec, SCALE_CONSTRAINTS[self.scale_constraint][0])

    def act_quantizer(self, absmax: float) -> ActQuantizer | None:
        """The input quantizer of one linear (``absmax``: its calibration inputs' max |x|)."""
        spec = self.act_spec
        return ActQuantizer.from_spec(spec, absmax) if spec.quantized else None


def _check_given(field: str, given: int, value: int, source: str) -> None:
    """LowbitError when ``given`` (0: from the format) contradicts the format's ``value``."""
    if given != 0 and given != value:
        raise LowbitError(
            f"{field} {given} contradicts the {source} ({value} bits); leave "
            f"{field} out or choose a {given}-bit format"
        )


def zqfp_solve(config: ZQFPConfig, weight: torch.Tensor, hessian: torch.Tensor) -> Solution:
    """GPTQ onto ``config``'s weight grid: W ``[R, C]``, H ``[C, C]``."""
    cfg = config.block_config
    if cfg is None:
        return gptq_solve(config, weight, hessian)
    q, used = gptq_quantize_blocks(weight, hessian, cfg, config.solver)
    return Solution(PackedBlockWeight.from_quantized(q), {"percdamp": used})


@register(
    ZQFPConfig,
    "ZeroQuant-FP: FP/INT weights by GPTQ, FP8/INT8 activations, M1/M2 scales, LoRC",
    distributed=True,
)
def apply_block(config: ZQFPConfig, ctx) -> list[LayerReport]:
    names = [n for n in ctx.table.linear_names if not config.ignores(ctx.full_name(n))]
    groups = ctx.table.sequential if config.true_sequential else (tuple(names),)
    reports: list[LayerReport] = []
    for group in groups:
        members = [n for n in group if n in names]
        if members:
            reports += _quantize_group(config, ctx, members)
    return reports


def _quantize_group(config: ZQFPConfig, ctx, names: list[str]) -> list[LayerReport]:
    """Hessians and input ranges of ``names`` from one pass, then each linear replaced."""
    with observe_absmax({n: ctx.module(n) for n in names}) as observed:
        hessians = ctx.collect_hessians(names)
    absmax = ctx.max_over_ranks(dict(observed))
    solutions = ctx.solve_layers(names, partial(timed_solve, ctx, config, zqfp_solve, hessians))
    reports = []
    for name in names:
        linear, h = ctx.module(name), hessians[name]
        start = time.perf_counter()
        solution, solve_seconds = solutions[name]
        act = config.act_quantizer(absmax[name])
        extra = {
            **solution.extra,
            "weight_format": config.weight_format,
            "activations": "not quantized" if act is None else f"{act.describe()}, simulated",
        }
        lowrank = None
        if config.lorc_rank:
            w_q = solution.stored.dequantize()
            try:
                lowrank = lorc(linear.weight, w_q, config.lorc_rank)
            except ValueError as exc:  # checked up front (check_shapes); a direct caller may not
                raise LowbitError(f"{ctx.full_name(name)}: {exc}; lower --lorc-rank") from None
            before = relative_errors(linear.weight, w_q, h)
            extra["weight_rel_err_before_lorc"], extra["hessian_rel_err_before_lorc"] = before
        quant = QuantLinear(solution.stored, linear.bias, act, lowrank)
        w_err, h_err = relative_errors(linear.weight, quant.effective_weight(), h)
        ctx.replace(name, quant)
        seconds = solve_seconds + time.perf_counter() - start
        reports.append(
            LayerReport(ctx.full_name(name), quant.bits_per_weight(), w_err, h_err, seconds, extra)
        )
    return reports
