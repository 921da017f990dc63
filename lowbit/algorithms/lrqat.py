"""LR-QAT (Bondarenko, Del Chiaro, Nagel 2024, arXiv 2406.06385): low-rank quantization-aware
training, after the authors' code (``lr_qat_fixed_point8``), plus a full-QAT baseline.

1. Range init per linear: scales ``s0`` by an L^p (p = 4) grid search on the weights
   (:func:`~lowbit.formats.range_search.lp_scales`), or from a PTQ run (RTN or GPTQ: ``Phi0``
   are then its integer codes and ``s0`` its scales). Embeddings, head and norms stay float.
2. Downcast once: ``Phi0 = phi(W0 / s0)`` replaces ``W0`` (int8 fixed point Q4.4 for 4 bits by
   default; ``int``, ``bf16``, ``fp16``, ``fp32``).
3. Train ``A``, ``B`` and ``s`` only, through ``W_hat = s * clamp(round(Phi0 + (alpha/r) A B))``
   with a straight-through round (:class:`~lowbit.nn.fake_quant_linear.LRQATLinear`), end to
   end on next-token loss (:mod:`lowbit.algorithms.lrqat_train`). With ``full_qat`` the float
   weights themselves train through the same fake quantizer instead
   (:class:`~lowbit.nn.fake_quant_linear.QATLinear`).
4. Merge: ``W_int = clamp(round(Phi0 + (alpha/r) A B))`` with the fp16 scales the forward used,
   stored as a plain packed integer weight (same artifact as an RTN/GPTQ run, no adapter).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.algorithms.gptq import GPTQConfig
from lowbit.algorithms.lrqat_train import RESUME_NEUTRAL, start_fingerprint, train
from lowbit.algorithms.rtn import RTNConfig
from lowbit.algorithms.weight_config import IntWeightConfig, check_rank
from lowbit.core.config import MethodConfig, option, with_default
from lowbit.core.method import register_model
from lowbit.core.report import LayerReport
from lowbit.data.calibration import check_seed
from lowbit.errors import LowbitError
from lowbit.formats.granularity import Group
from lowbit.formats.intq import IntGrid, expand_groups
from lowbit.formats.packed_int import PackedIntWeight
from lowbit.formats.range_search import lp_scales
from lowbit.models.arch import set_submodule
from lowbit.nn.fake_quant_linear import (
    PHIS,
    FakeQuantLinear,
    LRQATLinear,
    QATLinear,
    by_group,
    downcast,
    upcast,
)
from lowbit.nn.quant_linear import QuantLinear

INITS = ("lp", "rtn", "gptq")
TRAIN_DTYPES = ("bf16", "fp32")


@dataclass(frozen=True)
class LRQATConfig(IntWeightConfig):
    """LR-QAT settings (defaults: the authors' W4 per-channel recipe, scaled down for CPUs).

    The grid is signed symmetric (``symmetric`` must stay true), per output channel by default.
    """

    method = "lrqat"
    group_size: int = with_default(IntWeightConfig, "group_size", -1)
    rank: int = option(32, "rank r of the auxiliary matrices A [out, r] (zero init) and B "
                           "[r, in] (Kaiming)")
    alpha: float = option(1.0, "the low-rank product is scaled by alpha / rank (authors' code "
                               "default 1)")
    phi: str = option(
        "fixed_point8",
        "downcast of the frozen weights Phi0 = phi(W0 / s0): fixed_point8 (int8 with 8 - bits "
        "fractional bits: Q4.4 at 4 bits), int (rounded integers in int8), bf16, fp16, fp32",
        choices=tuple(PHIS),
    )
    init: str = option(
        "lp",
        "initial scales s0 and Phi0: lp (L^p grid search on the weights), rtn or gptq (a PTQ "
        "run on the calibration data: Phi0 = its integer codes, s0 = its scales)",
        choices=INITS,
    )
    lp_norm: float = option(4.0, "p of the L^p range search")
    lp_candidates: int = option(100, "clipping thresholds tried per group by the L^p search")
    full_qat: bool = option(False, "full-QAT baseline: train every quantized linear's float "
                                   "weights (and scales) through the same fake quantizer instead "
                                   "of the low-rank matrices")
    steps: int = option(200, "optimizer steps (0: no training, the initial grid is merged as is)")
    lr: float = option(1e-3, "learning rate of A and B")
    scale_lr: float = option(1e-5, "learning rate of the scales")
    weight_lr: float = option(5e-5, "learning rate of the float weights (full_qat only)")
    warmup_ratio: float = option(0.1, "fraction of the steps with linear warm-up; then linear "
                                      "decay")
    adam_beta2: float = option(0.95, "AdamW beta2 (beta1 0.9)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    batch_size: int = option(4, "training sequences per step")
    train_seqlen: int = option(512, "tokens per training sequence")
    train_corpus: str = option("austen-emma", "training text: bundled corpus name or text file "
                                              "(random windows)")
    train_seed: int = option(0, "seed of the training windows, of B's init and of the global "
                                "RNG")
    train_dtype: str = option(
        "bf16",
        "matmul precision of the training forward: bf16 (autocast, as the authors train; W_hat "
        "itself is always computed in fp32) or fp32",
        choices=TRAIN_DTYPES,
    )
    grad_checkpointing: bool = option(True, "recompute each decoder block's activations in the "
                                            "backward pass")
    checkpoint_every: int = option(50, "save resumable training state every this many steps "
                                       "(0: never)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.symmetric:
            raise LowbitError("LR-QAT trains on a signed symmetric grid; drop --asym")
        if self.phi not in PHIS:
            raise LowbitError(f"unknown --phi '{self.phi}'; choose one of {', '.join(PHIS)}")
        if self.phi == "fixed_point8" and self.bits > 7 and not self.full_qat:
            raise LowbitError(
                "--phi fixed_point8 keeps 8 - bits fractional bits in int8 and needs bits <= 7; "
                "use --phi int or --phi bf16 for 8-bit weights"
            )
        if self.init not in INITS:
            raise LowbitError(f"unknown --init '{self.init}'; choose one of {', '.join(INITS)}")
        _check(self.rank >= 1, f"--rank must be >= 1, got {self.rank}")
        _check(self.alpha > 0 and math.isfinite(self.alpha),
               f"--alpha must be a finite number > 0, got {self.alpha}")
        _check(self.lp_norm > 0 and math.isfinite(self.lp_norm),
               f"--lp-norm must be a finite number > 0, got {self.lp_norm}")
        _check(self.lp_candidates >= 1, "--lp-candidates must be >= 1")
        _check(self.steps >= 0, "--steps must be >= 0")
        for flag, lr in (("--lr", self.lr), ("--scale-lr", self.scale_lr),
                         ("--weight-lr", self.weight_lr)):  # NaN-safe: min() would skip a NaN
            _check(lr >= 0 and math.isfinite(lr), f"{flag} must be a finite number >= 0, got {lr}")
        _check(0 <= self.warmup_ratio <= 1, "--warmup-ratio must be in [0, 1]")
        _check(0 <= self.adam_beta2 < 1, "--adam-beta2 must be in [0, 1)")
        _check(self.weight_decay >= 0 and math.isfinite(self.weight_decay),
               f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        _check(self.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0: no clipping)")
        _check(self.batch_size >= 1, "--batch-size must be >= 1")
        _check(self.train_seqlen >= 2, "--train-seqlen must be >= 2")
        _check(self.checkpoint_every >= 0, "--checkpoint-every must be >= 0")
        _check(self.train_dtype in TRAIN_DTYPES, "--train-dtype must be bf16 or fp32")
        check_seed(self.train_seed, "--train-seed")

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """The low-rank matrices A, B: rank at most min(rows, columns) of every trained layer."""
        super().check_shapes(shapes)
        if not self.full_qat:
            check_rank(self, "--rank", self.rank, shapes)

    def ptq_config(self) -> MethodConfig:
        """The config of the PTQ run of ``init`` on this grid (GPTQ with static groups, so its
        codes stay in input order)."""
        grid = {
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": True,
            "ragged_groups": self.ragged_groups,
            "ignore": self.ignore,
        }
        if self.init == "gptq":
            static = isinstance(self.weight_spec.granularity, Group)
            return GPTQConfig(**grid, static_groups=static)
        return RTNConfig(**grid)

    def resume_key(self) -> dict[str, Any]:
        """The settings a resumed run must share with the interrupted one."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUME_NEUTRAL}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise LowbitError(message)


def ptq_grid(stored: PackedIntWeight, grid: IntGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed integers ``[R, C]`` fp32 (input column order) and scales ``[R, n]`` of a PTQ
    weight on ``grid``."""
    if stored.kind != "int" or stored.grid.bits != grid.bits or not stored.grid.symmetric:
        raise LowbitError("LR-QAT can start only from a symmetric integer PTQ weight of its bits")
    cols = stored.in_features
    zero = expand_groups(stored.zero_points(), stored.grid.group_width(cols), cols)
    ints = stored.codes().float() - zero
    if stored.perm is not None:
        if isinstance(stored.grid.granularity, Group):
            raise LowbitError("a PTQ start with act-order groups needs static groups")
        ints = ints[:, torch.argsort(stored.perm.long())]
    return ints, stored.scales.float()


def make_layer(module: nn.Module, config: LRQATConfig, generator) -> FakeQuantLinear:
    """The trainable fake-quantized replacement of an ``nn.Linear`` or a PTQ ``QuantLinear``."""
    grid = config.grid
    cols = module.in_features
    if isinstance(module, QuantLinear):
        ratio, scale = ptq_grid(module.stored_weight(), grid)
        weight = module.dequantized_weight()
    elif isinstance(module, nn.Linear):
        weight = module.weight.detach().float()
        scale = lp_scales(weight, grid, config.lp_norm, config.lp_candidates)
        ratio = by_group(torch.div, weight, scale, grid.group_width(cols))
    else:
        raise LowbitError(f"LR-QAT cannot train a {type(module).__name__}; expected nn.Linear")
    bias = module.bias
    if config.full_qat:
        return QATLinear(weight, scale, grid, bias)
    phi0 = downcast(ratio, config.phi, grid.bits)
    return LRQATLinear(phi0, config.phi, scale, grid, config.rank, config.alpha, bias, generator)


def attach(model: nn.Module, blocks, table, config: LRQATConfig) -> dict[str, FakeQuantLinear]:
    """Freeze ``model`` and replace every quantized linear of ``blocks`` by its trainable
    fake-quantized form; returns them by full name."""
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(config.train_seed)
    layers = {}
    for i, block in enumerate(blocks):
        for name in table.linear_names:
            full = f"{table.blocks}.{i}.{name}"
            if config.ignores(full):
                continue
            layers[full] = make_layer(block.get_submodule(name), config, generator)
            set_submodule(block, name, layers[full])
    return layers


@torch.no_grad()
def merge(
    model: nn.Module, layers: dict[str, FakeQuantLinear], initial: dict[str, torch.Tensor]
) -> list[LayerReport]:
    """Replace each trained layer by its merged :class:`QuantLinear`; one report per layer.

    ``weight_rel_err`` is ``||W_hat - W_ref|| / ||W_ref||`` with ``W_ref`` the frozen weights
    ``Phi0 * s0`` (LR-QAT) or the trained float weights (full QAT); no output error is
    measured (NaN). ``extra`` records the fraction of integers changed by training and the
    mean relative scale change.
    """
    reports = []
    for name, layer in layers.items():
        start = time.perf_counter()
        quant = layer.merged()
        w_hat = quant.dequantized_weight()
        s0 = initial[name]
        cols = layer.in_features
        changed = None
        if isinstance(layer, LRQATLinear):
            phi0 = upcast(layer.phi0, layer.phi, layer.grid.bits)
            ints0 = torch.clamp(torch.round(phi0), layer.qmin, layer.qmax)  # the A = 0 integers
            changed = float((layer.integers() != ints0).float().mean())
            ref = phi0 * expand_groups(s0, layer.grid.group_width(cols), cols)
        else:
            ref = layer.weight.detach()
        err = float((w_hat - ref).norm() / ref.norm().clamp(min=1e-30))
        scale_change = float((layer.effective_scale() / s0 - 1).abs().mean())
        set_submodule(model, name, quant)
        extra = {"integers_changed": changed, "scale_change": scale_change}
        seconds = time.perf_counter() - start
        reports.append(
            LayerReport(name, quant.bits_per_weight(), err, float("nan"), seconds, extra)
        )
    return reports


@torch.no_grad()
def _initial_scales(layers: dict[str, FakeQuantLinear]) -> dict[str, torch.Tensor]:
    """Per layer: the scales ``[out, n_groups]`` the first forward uses."""
    return {name: layer.effective_scale().clone() for name, layer in layers.items()}


@register_model(LRQATConfig, "LR-QAT: low-rank QAT on a downcast frozen grid (+ full QAT)")
def apply_model(config: LRQATConfig, ctx) -> tuple[list[LayerReport], dict[str, Any]]:
    """Initialise, train and merge; ``ctx`` is a
    :class:`~lowbit.engine.model_context.ModelContext`."""
    batches = None
    if config.steps > 0:  # drawn first: a missing corpus or windows that cannot fit fail at once
        n = config.steps * config.batch_size
        batches, sha = ctx.windows(config.train_corpus, n, config.train_seqlen, config.train_seed)
    ptq_reports = ctx.ptq(config.ptq_config()) if config.init != "lp" else []
    layers = attach(ctx.model, ctx.blocks, ctx.table, config)
    if not layers:
        raise LowbitError("every linear is ignored; nothing to train (check --ignore)")
    initial = _initial_scales(layers)
    facts: dict[str, Any] = {"mode": "full_qat" if config.full_qat else "lrqat", "steps": 0}
    if batches is not None:
        meta = {
            "config": config.resume_key(),
            "data_sha256": sha,
            "start_sha256": start_fingerprint(layers),
        }
        store, progress = ctx.checkpoints, ctx.progress
        with ctx.on_device() as model:  # trained on the device, merged back in CPU memory
            facts.update(train(model, ctx.blocks, layers, batches, config, meta, store, progress))
        facts.update(corpus=config.train_corpus, corpus_sha256=sha)
    reports = merge(ctx.model, layers, initial)
    init_reports = {r.name: r for r in ptq_reports}
    for r in reports:
        if r.name in init_reports:  # the PTQ start's errors (weight error vs. the float weights)
            r.extra["init_weight_rel_err"] = init_reports[r.name].weight_rel_err
            r.extra["init_hessian_rel_err"] = init_reports[r.name].hessian_rel_err
    return reports, {"training": facts}
