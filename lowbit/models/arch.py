"""Block tables: where the decoder blocks are and how their linears relate.

A table names, relative to the top-level ``*ForCausalLM`` module, the list of decoder blocks,
and relative to a block: the linears in the order a block computes them (``sequential`` groups:
linears in one group are quantized from one calibration pass), which norm feeds which linears
(used by smoothing/reassembly methods) and the norms' gain offset. Tables are found from the
model by :mod:`lowbit.models.discovery`; :data:`OVERRIDES` holds the ones it would get wrong
(docs/ARCHITECTURES.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class BlockTable:
    """Where a model's decoder blocks are and how a block's linears are grouped.

    Attributes:
        blocks: dotted path of the ``nn.ModuleList`` of decoder blocks.
        sequential: groups of linear names (relative to a block) in compute order; the linears of
            one group share an input.
        norm_feeds: pairs (norm name, linears it feeds directly).
        norm_gain_offset: the norms multiply by ``offset + weight`` (Gemma's ``1 + w``: 1.0;
            Llama's ``w``: 0.0); smoothing methods fold scales into ``offset + weight``.
        experts: block-relative names of mixture-of-experts modules unfused into one linear per
            expert matrix (:class:`~lowbit.models.experts.ExpertLinears`).
        row_feeds: pairs (linear, group) where scaling the linear's output rows by ``s`` scales
            the group's input channels by exactly ``s`` (Llama's ``up_proj`` for ``down_proj``:
            ``act(gate) * up`` is linear in ``up``; OPT's ``fc1`` through a ReLU; ``v_proj``
            for ``o_proj`` without grouped KV heads): smoothing divisors can be folded there.

    Whether windows start with BOS is the tokenizer's business, not the architecture's
    (Llama-2 adds BOS, SmolLM2, also a Llama, does not): see ``LoadedModel.add_bos``.
    """

    blocks: str
    sequential: tuple[tuple[str, ...], ...]
    norm_feeds: tuple[tuple[str, tuple[str, ...]], ...]
    norm_gain_offset: float = 0.0
    experts: tuple[str, ...] = ()
    row_feeds: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def is_expert(self, name: str) -> bool:
        """Whether block-relative linear ``name`` is one expert's matrix (its tokens are the
        ones routed to that expert)."""
        return any(name.startswith(f"{path}.") for path in self.experts)

    def producer_of(self, group: tuple[str, ...]) -> str | None:
        """The linear whose output rows scale ``group``'s input (:attr:`row_feeds`), or None
        (e.g. Phi-3's fused ``gate_up_proj``, a GELU MLP: nothing can be folded there)."""
        return dict((g, p) for p, g in self.row_feeds).get(tuple(group))

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)

    def block_of(self, name: str) -> int | None:
        """The decoder block a dotted model name lies in (``model.layers.3.mlp.up_proj.weight``:
        3), or None outside the blocks."""
        if not name.startswith(f"{self.blocks}."):
            return None
        return int(name[len(self.blocks) + 1 :].split(".", 1)[0])


# Tables for model types where discovery (lowbit.models.discovery) is wrong, each with its
# reason. None is known: discovery reproduces the hand-written tables lowbit had for llama,
# mistral, qwen2, gemma3_text and opt (kept as expectations in tests/test_discovery.py).
OVERRIDES: dict[str, BlockTable] = {}


def get_blocks(model: nn.Module, table: BlockTable) -> nn.ModuleList:
    return model.get_submodule(table.blocks)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
