"""Block structure found from the model itself, not from its name.

Two passes, as llm-compressor's sequential pipeline finds its subgraphs from the model:

- :func:`find_structure` reads the module tree (works on the meta device: nothing is run): the
  decoder-block list (the ``nn.ModuleList`` of the classes transformers will not split,
  ``_no_split_modules``), the linear-like modules of a block (``nn.Linear``, GPT-2's
  ``Conv1D``) and any fused expert modules (3-D parameters, transformers 5's MoE layout).
- :func:`trace_block` runs one short forward pass through the embeddings and block 0 (the rest
  of the model is not run, so only those need real weights) with hooks, and reads off the
  order in which the block computes its linears, which of them read the same input tensor, and
  which norm's output is exactly a group's input.
- :func:`norm_gain_offset` finds numerically whether a norm multiplies by ``w`` or by
  ``1 + w`` (Gemma), and refuses a module whose output is not affine in its gain (then nothing
  may be folded into it).

:func:`discover` combines them into a :class:`~lowbit.models.arch.BlockTable`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.arch import OVERRIDES, BlockTable
from lowbit.models.convert import linear_layout
from lowbit.models.experts import STAGE, ExpertLinears

log = logging.getLogger(__name__)


def linear_types() -> tuple[type[nn.Module], ...]:
    """Modules holding one 2-D weight applied as a matmul: ``nn.Linear`` and transformers'
    ``Conv1D`` (GPT-2 family; its weight is stored transposed, ``[in, out]``)."""
    from transformers.pytorch_utils import Conv1D

    return nn.Linear, Conv1D


def is_linear_like(module: nn.Module) -> bool:
    """A linear of the model, float or already quantized: an ``nn.Linear``, a ``Conv1D``, or
    any module with integer ``in_features`` and ``out_features`` attributes (lowbit's quantized
    and fake-quantized linears: structure is found the same way after quantization)."""
    if isinstance(module, linear_types()):
        return True
    return all(isinstance(getattr(module, a, None), int) for a in ("in_features", "out_features"))


def linear_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of the linear-like modules under ``root``, not descending into them
    (a quantized linear's add-ons are part of it)."""
    for name, child in root.named_children():
        if is_linear_like(child):
            yield name, child
        else:
            for sub, module in linear_modules(child):
                yield f"{name}.{sub}", module


@dataclass(frozen=True)
class Structure:
    """What the module tree says about a causal LM.

    Attributes:
        blocks: dotted path of the decoder blocks' ``nn.ModuleList``.
        linears: names (relative to a block) of block 0's linear-like modules, in module order.
        experts: names of block 0's modules holding fused expert weights (3-D parameters).
        unfused: names of block 0's experts modules unfused into one linear per expert matrix
            (:class:`~lowbit.models.experts.ExpertLinears`).
    """

    blocks: str
    linears: tuple[str, ...]
    experts: tuple[str, ...]
    unfused: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dataflow:
    """What one forward pass of block 0 shows.

    Attributes:
        sequential: groups of linear names in compute order; the linears of a group read the
            same input tensor.
        norm_feeds: ``(module name, group)`` for each module whose output is a group's input.
        unused: linears of the block the forward pass never called.
    """

    sequential: tuple[tuple[str, ...], ...]
    norm_feeds: tuple[tuple[str, tuple[str, ...]], ...]
    unused: tuple[str, ...]


def find_structure(model: nn.Module) -> Structure:
    """The decoder-block list and block 0's linear-like and fused-expert modules."""
    blocks = _block_list(model)
    block = model.get_submodule(blocks)[0]
    linears = tuple(n for n, _ in linear_modules(block))
    experts = tuple(
        n for n, m in block.named_modules()
        if not is_linear_like(m) and any(p.dim() == 3 for p in m.parameters(False))
    )
    unfused = tuple(n for n, m in block.named_modules() if isinstance(m, ExpertLinears))
    return Structure(blocks, linears, experts, unfused)


def _block_list(model: nn.Module) -> str:
    """The ``nn.ModuleList`` of same-class modules named in ``_no_split_modules`` (any such
    list when the model names none) holding the most parameters."""
    unsplit = set(getattr(model, "_no_split_modules", None) or ())
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kind = type(module[0])
        if any(type(m) is not kind for m in module) or (unsplit and kind.__name__ not in unsplit):
            continue
        found.append((sum(p.numel() for p in module.parameters()), name))
    if not found:
        raise LowbitError(
            f"found no list of decoder blocks in {type(model).__name__}; lowbit quantizes "
            "decoder-only causal LMs whose blocks are an nn.ModuleList"
        )
    return max(found)[1]


class _Stop(Exception):
    """Raised after block 0: the rest of the model is not needed."""


def _key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's contents: the same storage, shape and strides."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


@torch.no_grad()
def trace_block(model: nn.Module, structure: Structure, input_ids: torch.Tensor) -> Dataflow:
    """Run ``input_ids`` ``[1, L]`` through the embeddings and block 0, recording each linear's
    first input and every other submodule's output."""
    block = model.get_submodule(structure.blocks)[0]
    first_input: dict[str, tuple] = {}
    outputs: dict[tuple, str] = {}
    alive: list[torch.Tensor] = []  # keeps traced tensors alive so their storage is not reused

    def on_linear(name):
        def hook(_module, args):
            if name not in first_input and args and isinstance(args[0], torch.Tensor):
                alive.append(args[0])
                first_input[name] = _key(args[0])
        return hook

    def on_module(name):
        def hook(_module, _args, out):
            if isinstance(out, torch.Tensor):
                alive.append(out)
                outputs.setdefault(_key(out), name)
        return hook

    linears = set(structure.linears)
    hooks = [block.get_submodule(n).register_forward_pre_hook(on_linear(n)) for n in linears]
    hooks += [
        m.register_forward_hook(on_module(n)) for n, m in block.named_modules()
        if n and n not in linears and not is_linear_like(m)
    ]
    try:  # every expert runs, however few of the trace's tokens reach it
        _run_block0(model, block, input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return _dataflow(structure, first_input, outputs)


def _expert_stage(name: str, structure: Structure) -> tuple | None:
    """``("experts", module, stage)`` for a linear of an unfused expert
    (``mlp.experts.3.down_proj``: ``("experts", "mlp.experts", "down")``): the matrices of one
    stage of every expert form one group, quantized from one pass (each expert's Hessian still
    comes from its own tokens); None for other linears."""
    for path in structure.unfused:
        if name.startswith(f"{path}."):
            return ("experts", path, STAGE[name[len(path) + 1:].split(".", 1)[1]])
    return None


def _dataflow(structure: Structure, first_input: dict[str, tuple], outputs: dict) -> Dataflow:
    groups: dict[tuple, list[str]] = {}
    for name in first_input:  # dicts keep the order of the first calls
        groups.setdefault(_expert_stage(name, structure) or first_input[name], []).append(name)
    sequential = tuple(tuple(g) for g in groups.values())
    feeds = tuple(
        (outputs[key], tuple(group)) for key, group in groups.items() if key in outputs
    )
    unused = tuple(n for n in structure.linears if n not in first_input)
    return Dataflow(sequential, feeds, unused)


@contextmanager
def _gain(norm: nn.Module, value: torch.Tensor) -> Iterator[None]:
    saved = norm.weight.detach().clone()
    norm.weight.data.copy_(value)
    try:
        yield
    finally:
        norm.weight.data.copy_(saved)


@torch.no_grad()
def norm_gain_offset(norm: nn.Module, width: int) -> float | None:
    """``c`` when ``norm(x) = n(x) * (c + weight) + bias`` for every gain ``weight`` (``c`` = 0
    for Llama's RMSNorm, 1 for Gemma's), or None when the module is not affine in a 1-D gain
    of size ``width`` (nothing can be folded into it)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != (width,):
        return None
    norm = copy.deepcopy(norm).float()  # the probe in fp32 whatever the model's dtype
    weight = norm.weight
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, width, generator=gen).to(weight.dtype)
    bias = getattr(norm, "bias", None)
    bias = torch.zeros(width) if bias is None else bias.detach().float()
    with _gain(norm, torch.zeros_like(weight)):
        base = norm(x).float() - bias  # c * n(x)
    with _gain(norm, torch.ones_like(weight)):
        unit = norm(x).float() - bias - base  # n(x)
    offset = float((base * unit).sum() / (unit * unit).sum().clamp(min=1e-30))
    probe = torch.rand(width, generator=gen).to(weight.dtype) + 0.5
    with _gain(norm, probe):
        got = norm(x).float() - bias
    want = unit * (offset + probe.float())
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max())):
        return None
    return round(offset, 3)


def _widths(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` features of a linear-like module (Conv1D stores ``[in, out]``)."""
    if isinstance(module, linear_types()) and not isinstance(module, nn.Linear):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def _run_block0(model: nn.Module, block: nn.Module, input_ids: torch.Tensor) -> None:
    """Forward ``input_ids`` through the embeddings and ``block`` (block 0), then stop."""
    def stop(_module, _args, _out):
        raise _Stop

    handle = block.register_forward_hook(stop)
    experts = [m for m in block.modules() if isinstance(m, ExpertLinears)]
    for m in experts:
        m.calibrate_all = True
    try:
        model(input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
        for m in experts:
            m.calibrate_all = False


@torch.no_grad()
def _consumer_input(model, block, consumer: str, input_ids, producer: str | None = None,
                    scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 input ``[..., C]`` of linear ``consumer`` in block 0, with ``producer``'s output
    rows multiplied by ``scale`` ``[C]`` when given."""
    seen: list[torch.Tensor] = []

    def record(_module, args):
        if not seen:
            seen.append(args[0].detach().float().clone())

    def scaled(_module, _args, out):
        return out * scale.to(out.dtype)

    hooks = [block.get_submodule(consumer).register_forward_pre_hook(record)]
    if producer is not None:
        hooks.append(block.get_submodule(producer).register_forward_hook(scaled))
    try:
        _run_block0(model, block, input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return seen[0]


def row_feeds(model: nn.Module, structure: Structure, flow: Dataflow, input_ids: torch.Tensor,
              skip: set = frozenset()) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``(linear, group)`` where multiplying the linear's output rows by a random positive
    ``s`` multiplies the group's input channels by exactly ``s``, found by running block 0
    once per candidate (linears computed earlier, of the input's width, nearest first).

    Holds for ``act(gate) * up`` through ``up``, a ReLU, and attention through ``v_proj`` when
    every query head has its own value head; fails for GELU/SiLU of the candidate, a gate,
    grouped KV heads. Groups in ``skip`` (already norm-fed) and expert matrices are not probed.
    """
    block = model.get_submodule(structure.blocks)[0]
    order = [name for group in flow.sequential for name in group]
    exact = all(p.dtype == torch.float32 for p in block.parameters() if p.is_floating_point())
    tol = 1e-4 if exact else 3e-2  # half precision rounds the scaled and the plain paths
    found = []
    for group in flow.sequential:
        if group in skip or _expert_stage(group[0], structure):
            continue
        width = _widths(block.get_submodule(group[0]))[0]
        earlier = order[: order.index(group[0])]
        candidates = [n for n in reversed(earlier) if not _expert_stage(n, structure)
                      and _widths(block.get_submodule(n))[1] == width]
        if not candidates:
            continue
        base = _consumer_input(model, block, group[0], input_ids)
        if not base.abs().max() > 0:
            continue
        scale = torch.rand(width, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.5
        want = base * scale
        for name in candidates:
            got = _consumer_input(model, block, group[0], input_ids, name, scale)
            if float((got - want).abs().max()) <= tol * float(want.abs().max()):
                found.append((name, group))
                break
    return tuple(found)


def discover(model: nn.Module, input_ids: torch.Tensor | None = None) -> BlockTable:
    """The :class:`BlockTable` of ``model`` (embeddings and block 0 with real weights), found
    by :func:`find_structure`, :func:`trace_block`, :func:`norm_gain_offset` and
    :func:`row_feeds`.

    Feeds whose module is not an affine norm are dropped (smoothing and reassembly then refuse
    the groups they would fold into); norms that disagree on their gain offset are an error.
    """
    structure = find_structure(model)
    if input_ids is None:
        input_ids = torch.arange(2, 10).reshape(1, 8)
    flow = trace_block(model, structure, input_ids)
    if flow.unused:
        log.info("linears never called in a forward pass, left as they are: %s", flow.unused)
    block = model.get_submodule(structure.blocks)[0]
    width = _hidden_width(block, flow)
    feeds, offsets = [], set()
    for name, group in flow.norm_feeds:
        offset = norm_gain_offset(block.get_submodule(name), width)
        if offset is not None:
            feeds.append((name, group))
            offsets.add(offset)
    if len(offsets) > 1:
        raise LowbitError(
            f"the norms of {type(model).__name__} use different gain offsets {sorted(offsets)}; "
            "add a block table for it in lowbit/models/arch.py"
        )
    fed = {group for _name, group in feeds}
    return BlockTable(
        structure.blocks, flow.sequential, tuple(feeds), offsets.pop() if offsets else 0.0,
        structure.unfused, row_feeds(model, structure, flow, input_ids, skip=fed),
    )


def _hidden_width(block: nn.Module, flow: Dataflow) -> int:
    """Input width of the block's first linear (the hidden size)."""
    return _widths(block.get_submodule(flow.sequential[0][0]))[0]


def table_of(model: nn.Module) -> BlockTable:
    """The block table of ``model``: its override in :data:`lowbit.models.arch.OVERRIDES` (where
    discovery is known to be wrong), else :func:`discover`'s."""
    override = OVERRIDES.get(getattr(model.config, "model_type", ""))
    return override if override is not None else discover(model)


def names_table(config) -> BlockTable:
    """A table with only the names (the block list, one group per linear, no norm feeds) of
    the architecture of transformers ``config``, from a model built on the meta device: what
    is known without weights or a forward pass (the pre-flight estimate's needs)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    linear_layout(model)
    structure = find_structure(model)
    return BlockTable(structure.blocks, tuple((n,) for n in structure.linears), ())
