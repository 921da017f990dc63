"""The names transformers writes on disk for the tensors of lowbit's layout.

lowbit quantizes mixture-of-experts models with one linear per expert matrix
(``model.layers.0.mlp.experts.3.up_proj``, :mod:`lowbit.models.experts`). transformers 5 keeps
the experts fused in memory and converts names and layouts when it loads and saves: Qwen3-MoE's
checkpoints use the same per-expert names, Mixtral's use
``model.layers.0.block_sparse_moe.experts.3.w3`` (``w1`` gate, ``w3`` up, ``w2`` down). Exports
must use the checkpoint names, or the loader drops the tensors as unexpected.

The map is found by running transformers' own reverse conversion (what ``save_pretrained``
applies) on marker tensors: a fused ``gate_up_proj`` ``[E, 2, 1]`` holding ``2e + half`` and a
``down_proj`` ``[E, 1, 1]`` holding ``offset + e``; each output's value says which expert matrix
its name belongs to. No name is written down here.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models.experts import ExpertLinears

_DOWN = 1_000_000  # marker offset of down_proj values (above any 2E)


def _revert(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


def expert_module_names(model: nn.Module) -> dict[str, str]:
    """``{lowbit module name: checkpoint module name}`` for every expert matrix of ``model``'s
    unfused experts (empty for a dense model)."""
    names: dict[str, str] = {}
    for path, module in model.named_modules():
        if not isinstance(module, ExpertLinears):
            continue
        e = module.num_experts
        probe = {
            f"{path}.gate_up_proj": torch.arange(2 * e, dtype=torch.float64).reshape(e, 2, 1),
            f"{path}.down_proj": (torch.arange(e, dtype=torch.float64) + _DOWN).reshape(e, 1, 1),
        }
        reverted = _revert(model, probe)
        if len(reverted) != 3 * e:
            raise RuntimeError(f"the reverse conversion of {path} lost expert matrices")
        for key, value in reverted.items():
            if not key.endswith(".weight") or value.numel() != 1:
                raise RuntimeError(f"unexpected reverse conversion of {path}: {key}")
            code = int(value.item())
            if code >= _DOWN:
                own = f"{path}.{code - _DOWN}.down_proj"
            else:
                own = f"{path}.{code // 2}.{('gate_proj', 'up_proj')[code % 2]}"
            names[own] = key[: -len(".weight")]
    return names


def checkpoint_keys(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """``{key: checkpoint key}`` for tensor names ``keys`` of ``model`` in lowbit's layout: an
    expert matrix's tensors (``weight``, ``weight_packed``, ``weight_scale``, ...) follow
    :func:`expert_module_names`; every other key goes through transformers' reverse renaming
    (Mixtral's router ``mlp.gate`` -> ``block_sparse_moe.gate``)."""
    experts = expert_module_names(model)
    out: dict[str, str] = {}
    rest: dict[str, torch.Tensor] = {}
    for i, key in enumerate(keys):
        module, _, tensor = key.rpartition(".")
        if module in experts:
            out[key] = f"{experts[module]}.{tensor}"
        else:
            rest[key] = torch.tensor([float(i)], dtype=torch.float64)
    if not experts:  # dense models: transformers' save renames nothing lowbit loads
        return {**out, **{k: k for k in rest}}
    for new, marker in _revert(model, rest).items():
        out[keys[int(marker.item())]] = new
    return out
