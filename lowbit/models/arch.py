"""Per-architecture block tables: where the decoder blocks are and how their linears relate.

Adding an architecture = one :class:`BlockTable` entry in :data:`TABLES`. A table names, relative
to the top-level ``*ForCausalLM`` module, the list of decoder blocks, and relative to a block:
the linears in the order a block computes them (``sequential`` groups: linears in one group read
the same input), and which norm feeds which linears (used by smoothing/reassembly methods).

Extension points documented in docs/ARCHITECTURES.md: Mistral and Qwen2 share Llama's table;
OPT uses ``model.decoder.layers`` with ``fc1``/``fc2``; GPT-2 stores its linears as ``Conv1D``
(transposed weights) and needs a conversion to ``nn.Linear`` before it can be added here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.errors import LowbitError


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

    Whether windows start with BOS is the tokenizer's business, not the architecture's
    (Llama-2 adds BOS, SmolLM2, also a Llama, does not): see ``LoadedModel.add_bos``.
    """

    blocks: str
    sequential: tuple[tuple[str, ...], ...]
    norm_feeds: tuple[tuple[str, tuple[str, ...]], ...]
    norm_gain_offset: float = 0.0
    experts: tuple[str, ...] = ()

    def is_expert(self, name: str) -> bool:
        """Whether block-relative linear ``name`` is one expert's matrix (its tokens are the
        ones routed to that expert)."""
        return any(name.startswith(f"{path}.") for path in self.experts)

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)

    def block_of(self, name: str) -> int | None:
        """The decoder block a dotted model name lies in (``model.layers.3.mlp.up_proj.weight``:
        3), or None outside the blocks."""
        if not name.startswith(f"{self.blocks}."):
            return None
        return int(name[len(self.blocks) + 1 :].split(".", 1)[0])


_LLAMA = BlockTable(
    blocks="model.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    norm_feeds=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
)

_GEMMA3 = BlockTable(
    blocks="model.layers",
    sequential=_LLAMA.sequential,
    norm_feeds=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    norm_gain_offset=1.0,
)

_OPT = BlockTable(
    blocks="model.decoder.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    norm_feeds=(
        ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("final_layer_norm", ("fc1",)),
    ),
)

# Tables for model types where discovery (lowbit.models.discovery) is wrong, each with its
# reason. None is known: discovery reproduces every table below (tests/test_discovery.py).
OVERRIDES: dict[str, BlockTable] = {}

TABLES: dict[str, BlockTable] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma3_text": _GEMMA3,
    "opt": _OPT,
}


def table_for(model_type: str) -> BlockTable:
    """The block table of ``model_type`` or a LowbitError listing the supported ones."""
    if model_type not in TABLES:
        raise LowbitError(
            f"model type '{model_type}' has no block table; supported: {', '.join(TABLES)} "
            "(add one in lowbit/models/arch.py, see docs/ARCHITECTURES.md)"
        )
    return TABLES[model_type]


def get_blocks(model: nn.Module, table: BlockTable) -> nn.ModuleList:
    return model.get_submodule(table.blocks)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
