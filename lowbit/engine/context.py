"""What a method sees of the block it quantizes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.core.block_output import StopBlock, block_output
from lowbit.engine.capture import BlockInputs, capture_block_inputs
from lowbit.engine.distributed import max_over_ranks, solve_shared, sum_hessian
from lowbit.engine.hessian import GramCache, HessianAccumulator
from lowbit.engine.placement import CPU, home
from lowbit.models.arch import BlockTable, get_blocks, set_submodule
from lowbit.models.experts import ExpertLinears
from lowbit.nn.quant_linear import QuantLinear

log = logging.getLogger(__name__)


@dataclass
class BlockContext:
    """One decoder block under quantization, with its calibration inputs.

    Attributes:
        block: the block module (methods replace its linears in place).
        index: block number; ``prefix`` its dotted path in the model (``model.layers.3``).
        table: the architecture's block table.
        hidden: calibration inputs, list of ``[b, L, hidden]``.
        inputs: the captured call arguments of every block.
        all_experts: while Hessians are collected, every expert of a mixture-of-experts block
            sees every token (else each sees the tokens routed to it).
        calib_tokens: tokens each linear's Hessian was collected over (by block-relative name).
        device: where the block computes (it is there while the method runs); ``hidden`` live
            there or in (pinned) CPU memory, and each batch goes to ``device`` as it is used
            (:meth:`on_device`), each output back to where its input lives.
    """

    block: nn.Module
    index: int
    prefix: str
    table: BlockTable
    hidden: list[torch.Tensor]
    inputs: BlockInputs
    all_experts: bool = False
    calib_tokens: dict[str, int] = field(default_factory=dict)
    device: torch.device = CPU

    def on_device(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the block's device (the same tensor when it is there)."""
        return x.to(self.device, non_blocking=x.is_pinned())

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def module(self, name: str) -> nn.Module:
        return self.block.get_submodule(name)

    def replace(self, name: str, module: nn.Module) -> None:
        set_submodule(self.block, name, module)

    @torch.no_grad()
    def run(self, hidden: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The block's outputs for ``hidden`` (default: its calibration inputs)."""
        xs = self.hidden if hidden is None else hidden
        out = []
        with dense_kernels(self.block):
            for x in xs:
                y = block_output(self.block, self.on_device(x), self.inputs.call_for(self.index, x))
                out.append(home(y, x.device, x.is_pinned()))  # where its input lives
        return out

    @torch.no_grad()
    def collect_hessians(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Hessians ``[C, C]`` of the named linears' inputs over the calibration inputs (of
        every process, under torchrun).

        Each batch's forward stops as soon as every named linear has seen its input, so the
        q/k/v Hessians cost little more than the input norm; linears fed the same input share
        one ``X^T X`` per batch. An expert no calibration token
        reached gets the identity (GPTQ then rounds it as RTN does), with a warning.
        """
        accs = {n: HessianAccumulator(self.module(n).in_features, self.device) for n in names}
        seen: set[str] = set()
        grams = GramCache()  # X^T X once per distinct input (q/k/v share theirs)

        def observe(name: str, x: torch.Tensor) -> None:
            accs[name].add_gram(*grams.gram(x))
            seen.add(name)
            if len(seen) == len(accs):
                raise StopBlock

        hooks = [
            self.module(n).register_forward_pre_hook(
                lambda _m, args, name=n: observe(name, args[0])
            )
            for n in names
        ]
        with dense_kernels(self.block), experts_see_all(self.block, self.all_experts):
            try:
                for x in self.hidden:
                    seen.clear()
                    grams.clear()
                    try:
                        x = self.on_device(x)
                        block_output(self.block, x, self.inputs.call_for(self.index, x))
                    except StopBlock:
                        pass
            finally:
                for hook in hooks:
                    hook.remove()
        out = {}
        for name, acc in accs.items():
            out[name], self.calib_tokens[name] = sum_hessian(acc.hessian, acc.tokens)
            if self.calib_tokens[name] == 0:
                log.warning(
                    "%s saw no calibration tokens (an expert no token was routed to); it is "
                    "quantized without calibration data: use --calib-all-experts or more "
                    "samples", self.full_name(name),
                )
                out[name] = torch.eye(acc.hessian.shape[0], device=self.device)
        return out

    def solve_layers(self, names: list[str], solve: Callable[[str], Any]) -> dict[str, Any]:
        """``{name: solve(name)}``; under torchrun each linear is solved on one process and
        the answers exchanged (see :mod:`lowbit.engine.distributed`)."""
        return solve_shared(names, solve)

    def max_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Activation ranges observed on this process's windows -> over all windows."""
        return max_over_ranks(values)


@dataclass
class GroupContext:
    """Consecutive decoder blocks, each already quantized by the method's ``apply_block``.

    Attributes:
        blocks: the blocks' contexts, in order (``blocks[0].hidden`` is not kept current).
        hidden: the group's calibration inputs (outputs of the quantized blocks before it), list
            of ``[b, L, hidden]``.
        targets: the full-precision group's outputs for ``hidden`` (computed before the group
            was quantized), same shapes.
    """

    blocks: list[BlockContext]
    hidden: list[torch.Tensor]
    targets: list[torch.Tensor]

    def on_device(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the group's device (where its blocks compute)."""
        return self.blocks[0].on_device(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The group's output ``[b, L, hidden]`` on the group's device for ``x`` (anywhere;
        differentiable: no ``no_grad``)."""
        x = self.on_device(x)
        for ctx in self.blocks:
            x = block_output(ctx.block, x, ctx.inputs.call_for(ctx.index, x))
        return x


def run_blocks(contexts: list[BlockContext], hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs of the chain of ``contexts``' blocks for each tensor of ``hidden``."""
    for ctx in contexts:
        hidden = ctx.run(hidden)
    return hidden


@contextmanager
def dense_kernels(block: nn.Module) -> Iterator[None]:
    """Run ``block``'s quantized linears as dequantize-once dense fp32 matmuls.

    Calibration batches have thousands of tokens, where one dense matmul over the cached
    dequantized weight beats the packed per-call paths (SpQR's tiled decode took ~40% of a
    gemma3 SpQR run). The caches stay until :func:`drop_dense_caches`, so later passes over the
    same block reuse them.
    """
    layers = [m for m in block.modules() if isinstance(m, QuantLinear)]
    modes = [m.kernel for m in layers]
    for m in layers:
        m.set_kernel_mode("reference")
    try:
        yield
    finally:
        for m, mode in zip(layers, modes, strict=True):
            m.set_kernel_mode(mode)


@contextmanager
def experts_see_all(block: nn.Module, on: bool) -> Iterator[None]:
    """With ``on``, every expert of ``block``'s mixture-of-experts modules runs on every token
    while the context lasts (their outputs still sum only the routed experts)."""
    experts = [m for m in block.modules() if isinstance(m, ExpertLinears)] if on else []
    for m in experts:
        m.calibrate_all = True
    try:
        yield
    finally:
        for m in experts:
            m.calibrate_all = False


def drop_dense_caches(block: nn.Module) -> None:
    """Free the fp32 weights :func:`dense_kernels` cached in ``block``'s quantized linears."""
    for m in block.modules():
        if isinstance(m, QuantLinear):
            m.drop_cache()


def first_block_layers(
    model: nn.Module, table: BlockTable, ids: torch.Tensor, names: list[str],
    batch_size: int = 8,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(weight, Hessian)`` fp32 of the first decoder block's linears ``names`` (relative to
    the block) on calibration tokens ``ids`` ``[N, L]``: real layers for tests and
    benchmarks."""
    blocks = get_blocks(model, table)
    inputs = capture_block_inputs(model, blocks, ids, batch_size)
    ctx = BlockContext(blocks[0], 0, table.blocks + ".0", table, inputs.hidden, inputs)
    hessians = ctx.collect_hessians(names)
    return {n: (ctx.module(n).weight.detach().float().clone(), hessians[n]) for n in names}
