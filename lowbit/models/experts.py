"""Fused mixture-of-experts weights as one linear per expert matrix.

transformers 5 keeps the experts of Qwen3-MoE, Mixtral and their kin fused in 3-D parameters
(``experts.gate_up_proj`` ``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``), which nothing
that looks for linears finds. :func:`unfuse_experts` replaces each such module by
:class:`ExpertLinears`: the same computation (the same ops in the same order: the logits are
bit-identical) through ``experts.{e}.gate_proj``, ``experts.{e}.up_proj`` and
``experts.{e}.down_proj`` ``nn.Linear`` modules: the names and shapes of the checkpoints on the
Hub (and of what transformers 5 writes), so saved and exported names need no mapping. Each
expert matrix is then quantized as a matrix of its own, with a Hessian from exactly the tokens
routed to it; the routers stay in full precision.

``calibrate_all`` (set by the engine during calibration when asked) runs every expert on every
token, as llm-compressor's MoE calibration does, so experts that few tokens reach still get a
Hessian; the block's output then still uses only each token's routed experts.
"""

from __future__ import annotations

import torch
from torch import nn

FUSED = ("gate_up_proj", "down_proj")
# Which of an expert's matrices read the same input: one calibration pass per stage.
STAGE = {"gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}


class Expert(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, ``gate_proj`` and ``up_proj`` ``[I, H]`` (the
    halves of the fused ``gate_up_proj`` ``[2I, H]``, gate first), ``down_proj`` ``[H, I]``."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module) -> None:
        super().__init__()
        gate, up = gate_up.chunk(2, dim=0)
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _linear(weight: torch.Tensor) -> nn.Linear:
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device=weight.device,
                       dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return linear


class ExpertLinears(nn.Module):
    """A fused experts module's forward over per-expert :class:`Expert` modules.

    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``, the
    interface of transformers' fused experts. ``routed_tokens`` ``[E]`` counts the tokens each
    expert received since the last :meth:`reset_counts` (the calibration report).
    """

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        self.num_experts = fused.gate_up_proj.shape[0]
        for e in range(self.num_experts):
            self.add_module(str(e), Expert(fused.gate_up_proj[e], fused.down_proj[e], fused.act_fn))
        self.calibrate_all = False
        self.register_buffer(
            "routed_tokens", torch.zeros(self.num_experts, dtype=torch.int64), persistent=False
        )

    def expert(self, e: int) -> Expert:
        return self.get_submodule(str(e))

    def reset_counts(self) -> None:
        self.routed_tokens.zero_()

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            mask = mask.permute(2, 1, 0)  # [E + 1, k, T]
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        if self.calibrate_all:
            return self._all_experts(hidden_states, mask, top_k_weights, out)
        for index in hit:
            e = int(index[0])
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            self.routed_tokens[e] += token_idx.numel()
            y = self.expert(e)(hidden_states[token_idx])
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def _all_experts(self, hidden_states, mask, top_k_weights, out) -> torch.Tensor:
        """Every expert sees every token; each token's output still sums its routed experts."""
        for e in range(self.num_experts):
            top_k_pos, token_idx = torch.where(mask[e])
            self.routed_tokens[e] += token_idx.numel()
            y = self.expert(e)(hidden_states)[token_idx]
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers fused experts module: 3-D ``gate_up_proj`` and ``down_proj``."""
    return all(
        isinstance(getattr(module, n, None), torch.Tensor) and getattr(module, n).dim() == 3
        for n in FUSED
    ) and hasattr(module, "act_fn")


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` by :class:`ExpertLinears`, in place;
    returns the names replaced (empty for a dense model)."""
    names = [n for n, m in model.named_modules() if is_fused_experts(m)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, ExpertLinears(owner.get_submodule(child)))
    return names


def expert_modules(model: nn.Module) -> dict[str, ExpertLinears]:
    """The unfused experts modules of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertLinears)}
