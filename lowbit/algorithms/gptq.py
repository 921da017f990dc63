"""GPTQ (Frantar et al. 2022): quantize columns one at a time, pushing each column's error
onto the not-yet-quantized columns through the inverse Hessian's Cholesky factor.

Follows the reference implementation: H = (2/n) sum x x^T, dead columns (diag(H) == 0) zeroed,
damping ``percdamp * mean(diag H)`` (multiplied by 10 while the Cholesky factorisation fails),
optional act-order (columns by decreasing diag(H)), lazy block updates of ``block_size``
columns, dynamic group statistics computed on the error-updated weights when a group starts, or
static groups computed up front on the original weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from lowbit.algorithms.linearwise import Solution, quantize_linearwise
from lowbit.algorithms.weight_config import BlockFormatConfig, IntWeightConfig
from lowbit.core.config import option
from lowbit.core.method import register
from lowbit.core.report import LayerReport
from lowbit.core.threads import threads_for, torch_threads
from lowbit.errors import LowbitError
from lowbit.formats.blockscale import BlockQuantized, BlockScaledConfig, BlockScales, compute_scales
from lowbit.formats.element import get_format
from lowbit.formats.gguf_blocks import GGUFBlockWeight, fit_rows
from lowbit.formats.gguf_layout import decode_codes, ggml_type, sub_params
from lowbit.formats.gguf_quant import round_to_grid
from lowbit.formats.granularity import PerChannel, PerTensor, group_width
from lowbit.formats.intq import IntGrid, dequantize, minmax_params, pad_to_groups, quantize
from lowbit.formats.packed_int import PackedIntWeight

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQSolver:
    """The GPTQ loop's settings, passed as one object through :func:`gptq_columns`,
    :func:`gptq_quantize`, :func:`gptq_quantize_blocks` and SpQR's loop: damping ``percdamp``
    (a fraction of mean(diag H), in (0, 10]), ``act_order`` (columns by decreasing diag(H)),
    ``static_groups`` (group statistics from the original weights, up front) and
    ``block_size`` (columns per lazy update, >= 1). Method configs give theirs as
    ``config.solver``."""

    percdamp: float = 0.01
    act_order: bool = True
    static_groups: bool = False
    block_size: int = 128

    def __post_init__(self) -> None:
        if not 0 < self.percdamp <= 10:
            raise LowbitError(f"percdamp must be in (0, 10], got {self.percdamp} (--percdamp)")
        if self.block_size < 1:
            raise LowbitError(f"block_size must be >= 1, got {self.block_size} (--block-size)")


DEFAULT_SOLVER = GPTQSolver()  # the reference code's defaults
STATIC_SOLVER = GPTQSolver(static_groups=True)  # block-scaled weights store no permutation


@dataclass(frozen=True)
class GPTQSettings(IntWeightConfig):
    """The settings every GPTQ-based method shares (GPTQ, SpQR, ZeroQuant-FP): one declaration
    of the solver's fields and ``true_sequential``; a method with other defaults redeclares a
    field with :func:`~lowbit.core.config.with_default`. :attr:`solver` is the
    :class:`GPTQSolver` they make (dynamic groups here; GPTQ adds ``static_groups``)."""

    percdamp: float = option(0.01, "damping as a fraction of mean(diag H)")
    act_order: bool = option(True, "quantize columns by decreasing diag(H); the order is stored "
                                   "when groups follow it (dynamic groups), not with static "
                                   "groups")
    block_size: int = option(128, "columns per lazy update block")
    true_sequential: bool = option(True, "collect each sequential group's Hessians after the "
                                         "previous group is quantized (q/k/v, then o, then "
                                         "gate/up, then down)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.solver  # noqa: B018  (validates percdamp and block_size)

    @property
    def solver(self) -> GPTQSolver:
        return GPTQSolver(self.percdamp, self.act_order, False, self.block_size)


@dataclass(frozen=True)
class GPTQConfig(GPTQSettings, BlockFormatConfig):
    """GPTQ settings: the shared solver settings of :class:`GPTQSettings` (the reference
    code's, act-order on), the weight format of :class:`BlockFormatConfig` (``int`` or a
    llama.cpp block type) and static groups, on by default (llm-compressor's
    ``actorder="static"``): columns are visited by decreasing diag(H) but the groups stay in
    weight order, so no permutation is stored and the result exports to every layout
    (compressed-tensors, vLLM). ``static_groups=False`` (``--no-static-groups``) is the
    reference code's act-order with groups that follow the visiting order (the permutation
    stored, GPTQ layout ``desc_act``). Saved folders record the value in their recipe; one
    without it predates this default and meant ``False``."""

    method = "gptq"
    static_groups: bool = option(True, "group statistics from the original weights before any "
                                       "update, groups in the original column order (no "
                                       "permutation stored; exports everywhere); "
                                       "--no-static-groups: groups follow act-order, the "
                                       "permutation is stored (GPTQ layout desc_act only)")

    @property
    def solver(self) -> GPTQSolver:
        return GPTQSolver(self.percdamp, self.act_order, self.static_groups, self.block_size)


def inverse_hessian_cholesky(
    hessian: torch.Tensor, percdamp: float, max_tries: int = 6
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp I)^-1, raising damp x10 until it factorises.

    Args:
        hessian: ``[C, C]`` fp32, symmetric PSD (dead columns already set to 1 on the diagonal).
    Returns:
        ``U`` ``[C, C]`` fp32 upper triangular and the percdamp actually used.
    """
    if not bool(torch.isfinite(hessian).all()):
        raise LowbitError(
            "the Hessian holds NaN or infinite values (the layer's calibration inputs "
            "overflowed); check the model's weights and run in fp32"
        )
    mean_diag = torch.mean(torch.diag(hessian))
    first = percdamp
    for _ in range(max_tries):
        # at most three [C, C] copies besides H alive at once (a 70B down_proj's H is 3.3 GiB)
        damped = hessian.clone()
        damped.diagonal().add_(percdamp * mean_diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            inv = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info == 0:
                return upper, percdamp
        log.warning("Hessian not positive definite at percdamp=%g; retrying x10", percdamp)
        percdamp *= 10
    raise LowbitError(
        f"the Hessian stayed indefinite after damping escalation (percdamp {first:g} raised "
        f"x10 {max_tries} times); raise --percdamp or calibrate with more samples (--nsamples)"
    )


@dataclass
class GPTQResult:
    """Codes ``[R, C]`` uint8 in stored order, scales/zeros ``[R, n_groups]`` fp32, the stored
    permutation (``None`` when codes are in input order) and the percdamp used."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    perm: torch.Tensor | None
    percdamp: float


def prepare_hessian(
    weight: torch.Tensor, hessian: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of W ``[R, C]`` and H ``[C, C]`` in fp32 with dead input columns neutralised."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    return w, h


class ColumnQuantizer(Protocol):
    """How GPTQ rounds one column onto a grid whose statistics are per (row, group).

    GPTQ calls :meth:`fit_static` once (static groups) or :meth:`fit_group` when a group's
    first column comes up (dynamic groups, on the error-updated weights), :meth:`use_group`
    before each column in static mode, then :meth:`round_column`, which returns the column's
    codes ``[R]`` (any dtype: integer codes, or element values encoded later) and its
    dequantized values ``[R, 1]``.
    """

    def group_width(self, cols: int) -> int: ...
    def fit_static(self, w: torch.Tensor) -> None: ...  # w [R, C], input column order
    def fit_group(self, g: int, window: torch.Tensor) -> None: ...  # window [R, <= width]
    def use_group(self, g: int) -> None: ...
    def round_column(self, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class IntColumns:
    """:class:`ColumnQuantizer` for an :class:`IntGrid`: min-max scale and zero per group.

    After GPTQ, ``scales`` and ``zeros`` ``[R, n_groups]`` fp32 hold every group's statistics.
    """

    def __init__(
        self, grid: IntGrid, rows: int, cols: int, device: torch.device | None = None
    ) -> None:
        self.grid = grid
        self.scales = torch.zeros(rows, grid.num_groups(cols), device=device)
        self.zeros = torch.zeros(rows, grid.num_groups(cols), device=device)
        self.scale = self.zero = None

    def group_width(self, cols: int) -> int:
        return self.grid.group_width(cols)

    def fit_static(self, w: torch.Tensor) -> None:
        self.scales, self.zeros = _static_params(w, self.grid)

    def fit_group(self, g: int, window: torch.Tensor) -> None:
        grid = self.grid
        self.scale, self.zero = minmax_params(window, grid.bits, grid.symmetric, grid.round_zero)
        self.scales[:, g], self.zeros[:, g] = self.scale[:, 0], self.zero[:, 0]

    def use_group(self, g: int) -> None:
        self.scale, self.zero = self.scales[:, g : g + 1], self.zeros[:, g : g + 1]

    def round_column(self, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = quantize(col, self.scale, self.zero, self.grid.bits)
        return q[:, 0].to(torch.uint8), dequantize(q, self.scale, self.zero)


class BlockColumns:
    """:class:`ColumnQuantizer` for a block-scaled format (FP4/FP8/int elements, any scale rule
    of :mod:`lowbit.formats.blockscale` except a per-tensor block or an NVFP4 tensor scale).

    Dynamic groups take their scale from the window GPTQ hands over, by the config's own rule;
    for ``m2`` the real per-row scale is fixed up front from the original weights and only the
    power-of-two ratio ``2**k`` is fitted per group (``k = ceil(log2(amax / E.max / r))``, the
    ``m1`` rule applied to ``window / r``). ``result(codes)`` gives the
    :class:`~lowbit.formats.blockscale.BlockQuantized` whose dequantized values are exactly the
    ones GPTQ fed back.
    """

    def __init__(self, cfg: BlockScaledConfig, weight: torch.Tensor) -> None:
        if isinstance(cfg.granularity, PerTensor) or cfg.tensor_scale:
            raise LowbitError(
                "GPTQ on block-scaled formats needs groups or per-channel scales and no tensor "
                "scale"
            )
        self.cfg, self.elem = cfg, cfg.element_format
        self.rows, self.cols = weight.shape
        self.row_scales = None
        if cfg.scale_rule == "m2":
            self.row_scales = compute_scales(weight.float(), cfg).row_scales
        self.scales: torch.Tensor | None = None
        self.effective: torch.Tensor | None = None  # [R, n_groups] fp32
        self.scale: torch.Tensor | None = None

    def group_width(self, cols: int) -> int:
        return group_width(self.cfg.granularity, cols)

    def _store(self, g: int, codes: torch.Tensor) -> None:
        if self.scales is None:
            n = self.cfg.block_grid(self.rows, self.cols)[1]
            self.scales = torch.zeros(self.rows, n, dtype=codes.dtype, device=codes.device)
        self.scales[:, g] = codes[:, 0]

    def fit_static(self, w: torch.Tensor) -> None:
        block = compute_scales(w, self.cfg)
        self.scales, self.row_scales, self.effective = (
            block.scales,
            block.row_scales,
            block.effective(),
        )

    def fit_group(self, g: int, window: torch.Tensor) -> None:
        if self.row_scales is None:
            block = compute_scales(window, replace(self.cfg, granularity=PerChannel()))
            self._store(g, block.scales)
            self.scale = block.effective()
            return
        r = self.row_scales.float()[:, None]
        ratio_cfg = replace(self.cfg, granularity=PerChannel(), scale_format="e8m0",
                            scale_rule="m1")
        codes = compute_scales(window / r, ratio_cfg).scales
        zero = window.abs().amax(dim=1, keepdim=True) == 0
        codes = torch.where(zero, torch.full_like(codes, 127), codes)  # m2's 2**0 for zeros
        self._store(g, codes)
        self.scale = r * get_format("e8m0").decode(codes)

    def use_group(self, g: int) -> None:
        self.scale = self.effective[:, g : g + 1]

    def round_column(self, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Element values (float32, encoded once in :meth:`result`) and dequantized values."""
        elements = self.elem.round(col / self.scale).float()
        return elements[:, 0], elements * self.scale

    def result(self, elements: torch.Tensor) -> BlockQuantized:
        """The quantized weight from the element values ``[R, C]`` GPTQ chose."""
        scales = BlockScales(self.cfg, self.rows, self.cols, self.scales, self.row_scales)
        return BlockQuantized(self.elem.encode(elements), scales)


def gptq_columns(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantizer: ColumnQuantizer,
    solver: GPTQSolver = DEFAULT_SOLVER,
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """The GPTQ loop on any column grid: minimise tr(E H E^T) for W ``[R, C]``, H ``[C, C]``.

    Returns the codes ``[R, C]`` (stored column order, the dtype ``round_column`` gives), the
    stored permutation (``None`` in input order: no act-order, or static groups) and the
    percdamp used; the quantizer holds the group statistics.

    The reference loop, with its per-column work kept to the rounding and one rank-1 update:
    each lazy block is updated in place in ``w`` (the reference's clone and its per-group
    concatenation read the same values), and the column loop runs on one thread (its
    operations are a few hundred rows wide: worker threads only add synchronisation, which
    costs tens of times the work on a loaded machine); the per-block update keeps the
    caller's threads, and so does the factorisation of a large H
    (:func:`~lowbit.core.threads.threads_for`).
    """
    w, h = prepare_hessian(weight, hessian)
    rows, cols = w.shape
    group = quantizer.group_width(cols)
    static_groups, block_size = solver.static_groups, solver.block_size
    if static_groups:
        quantizer.fit_static(w)
    perm = torch.argsort(torch.diag(h), descending=True) if solver.act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm[:, None], perm]  # one [C, C] copy, not two
    with torch_threads(threads_for(h.numel())):
        upper, used = inverse_hessian_cholesky(h, solver.percdamp)
    del h  # the loop reads only its inverse's factor
    order = perm.tolist() if perm is not None else list(range(cols))
    diag = upper.diagonal().tolist()
    err = torch.empty(rows, min(block_size, cols), device=w.device)
    codes = None  # allocated with the dtype of the quantizer's codes
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        err1 = err[:, : i2 - i1]
        with torch_threads(1):
            for col in range(i1, i2):
                if static_groups:
                    quantizer.use_group(order[col] // group)
                elif col % group == 0:
                    quantizer.fit_group(col // group, w[:, col : col + group])
                x = w[:, col : col + 1]
                code, q = quantizer.round_column(x)
                if codes is None:
                    codes = torch.empty(rows, cols, dtype=code.dtype, device=code.device)
                codes[:, col] = code
                e = err1[:, col - i1 : col - i1 + 1]
                torch.sub(x, q, out=e).div_(diag[col])
                w[:, col + 1 : i2].sub_(e * upper[col : col + 1, col + 1 : i2])
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    if static_groups and perm is not None:
        codes, perm = codes[:, torch.argsort(perm)], None
    return codes, perm, used


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: IntGrid,
    solver: GPTQSolver = DEFAULT_SOLVER,
) -> GPTQResult:
    """Quantize ``weight`` ``[R, C]`` on ``grid`` minimising tr(E H E^T), H ``[C, C]``."""
    quantizer = IntColumns(grid, *weight.shape, device=weight.device)
    codes, perm, used = gptq_columns(weight, hessian, quantizer, solver)
    return GPTQResult(codes, quantizer.scales, quantizer.zeros, perm, used)


def gptq_quantize_blocks(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    cfg: BlockScaledConfig,
    solver: GPTQSolver = STATIC_SOLVER,
) -> tuple[BlockQuantized, float]:
    """GPTQ onto a block-scaled format (FP4/FP8 with amax, M1 or M2 scales, ...).

    Args:
        weight: ``[R, C]`` float; hessian: ``[C, C]``.
        solver: with ``static_groups`` (the default here) scales come from the original
            weights (required with ``act_order``: a block-scaled weight stores no column
            permutation); otherwise each group's scale is fitted on the error-updated weights
            when GPTQ reaches its first column.
    Returns:
        The quantized weight (codes ``[R, C]`` uint8 in input order, its scales) and the
        percdamp used.
    """
    if solver.act_order and not solver.static_groups:
        raise LowbitError(
            "block-scaled weights store no column permutation: use static groups with "
            "act-order, or turn act-order off to fit each group's scale as GPTQ reaches it"
        )
    quantizer = BlockColumns(cfg, prepare_hessian(weight, hessian)[0])
    codes, _, used = gptq_columns(weight, hessian, quantizer, solver)
    return quantizer.result(codes), used


class GGUFColumns:
    """:class:`ColumnQuantizer` onto a llama.cpp block type (static groups only).

    :meth:`fit_static` fits every block's parameters up front from the original weights with
    llama.cpp's quantizer weighted by ``importance`` ``[C]`` (GPTQ passes diag(H), the
    calibration inputs' mean squares: an imatrix), so the fp16 ``d``/``dmin`` and the quantized
    sub-block scales are already the stored ones; each column is then rounded to the nearest
    point of that fixed grid, and the value fed back is exactly llama.cpp's decode of it.
    """

    def __init__(self, ggml_type_name: str, importance: torch.Tensor) -> None:
        self.type = ggml_type(ggml_type_name)
        self.importance = importance
        self.fields = None
        self.scale = self.offset = None

    def group_width(self, cols: int) -> int:
        return self.type.sub

    def fit_static(self, w: torch.Tensor) -> None:
        self.fields = fit_rows(w, self.type.name, self.importance)
        self.scales, self.offsets = sub_params(self.type, self.fields)

    def fit_group(self, g: int, window: torch.Tensor) -> None:
        raise LowbitError("gguf weight formats fit their blocks up front: use static groups")

    def use_group(self, g: int) -> None:
        self.scale = self.scales[:, g : g + 1]
        self.offset = None if self.offsets is None else self.offsets[:, g : g + 1]

    def round_column(self, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = round_to_grid(col, self.scale, self.offset, self.type)
        return q[:, 0], decode_codes(q, self.scale, self.offset, self.type.zero)

    def result(self, codes: torch.Tensor) -> GGUFBlockWeight:
        """The stored weight of codes ``[R, C]`` uint8 (input order) on the fitted blocks."""
        self.fields.q = codes
        return GGUFBlockWeight.from_fields(self.fields, self.type.name)


def gptq_quantize_gguf(
    weight: torch.Tensor, hessian: torch.Tensor, ggml_type_name: str, solver: GPTQSolver
) -> tuple[GGUFBlockWeight, float]:
    """GPTQ onto llama.cpp type ``ggml_type_name`` for W ``[R, C]``, H ``[C, C]``: blocks fitted
    up front (static groups, whatever ``solver`` says; act-order still orders the columns and
    no permutation is stored). Returns the stored weight and the percdamp used."""
    diag = torch.diag(hessian).float()  # diag(H) as prepare_hessian leaves it: dead inputs 1
    quantizer = GGUFColumns(ggml_type_name, torch.where(diag == 0, torch.ones_like(diag), diag))
    codes, _, used = gptq_columns(weight, hessian, quantizer, replace(solver, static_groups=True))
    return quantizer.result(codes), used


def _static_params(w: torch.Tensor, grid: IntGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero ``[R, n_groups]`` from the original weights."""
    grouped, _ = pad_to_groups(w, grid.group_width(w.shape[1]))
    scale, zero = minmax_params(grouped, grid.bits, grid.symmetric, grid.round_zero)
    return scale.squeeze(-1), zero.squeeze(-1)


def gptq_solve(config: GPTQSettings, weight: torch.Tensor, hessian: torch.Tensor) -> Solution:
    if isinstance(config, BlockFormatConfig) and config.gguf_type is not None:
        ggml_type_name = config.gguf_type_for(weight.shape[1])
        stored, used = gptq_quantize_gguf(weight, hessian, ggml_type_name, config.solver)
        return Solution(stored, {"percdamp": used, "ggml_type": ggml_type_name})
    grid = config.grid
    res = gptq_quantize(weight, hessian, grid, config.solver)
    stored = PackedIntWeight.from_codes(res.codes, res.scales, res.zeros, grid, res.perm)
    return Solution(stored, {"percdamp": res.percdamp})


@register(
    GPTQConfig,
    "GPTQ: Hessian-aware error feedback, act-order, lazy blocks",
    distributed=True,
)
def apply_block(config: GPTQConfig, ctx) -> list[LayerReport]:
    return quantize_linearwise(ctx, config, gptq_solve, config.true_sequential)
