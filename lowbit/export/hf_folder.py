"""Writing an export folder: the source DIR's float tensors and tokenizer, new quantized
tensors, and a ``config.json`` with the target's quantization config and provenance.

Shared by every export target (:mod:`lowbit.export.compressed_tensors`,
:mod:`lowbit.export.gptq_layout`, :mod:`lowbit.export.spqr_layout`); the folder is written
atomically like a lowbit DIR.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.atomic import atomic_dir
from lowbit.errors import LowbitError
from lowbit.export.lowbit_format import MANIFEST, WEIGHTS, load_quantized, quantized_layers
from lowbit.export.provenance import CONFIG_KEY
from lowbit.models.checkpoint_names import checkpoint_keys
from lowbit.models.convert import layout_of

# files of a lowbit DIR that an export rewrites instead of copying
_REWRITTEN = {MANIFEST, WEIGHTS, "config.json"}


def refusal(name: str, what: str, target: str, expressible: str) -> str:
    """The one-line message for a layer that export ``target`` cannot express exactly."""
    return f"layer {name}: {what}; {target} cannot express it. Exportable: {expressible}"


def check_export_dir(out: str | Path, src: str | Path) -> Path:
    """LowbitError unless ``out`` is absent or an empty folder, and not ``src`` itself."""
    out = Path(out)
    if out.resolve() == Path(src).resolve():
        raise LowbitError(f"--out {out} is the source DIR; choose another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LowbitError(f"output folder {out} exists and is not empty; choose another --out")
    return out


def load_source(src: str | Path, out: str | Path) -> tuple[Path, Path, Any, dict, dict[str, Any]]:
    """Check ``out`` (:func:`check_export_dir`) and load lowbit DIR ``src``:
    ``(src, out, model, manifest, {name: QuantLinear})``; LowbitError if nothing is quantized."""
    src = Path(src)
    out = check_export_dir(out, src)
    model, _, manifest = load_quantized(src)
    converted = layout_of(model)["conv1d"]
    if converted:
        raise LowbitError(
            f"{src} is a {model.config.model_type} model: its linears are GPT-2 Conv1D modules "
            f"(stored [in, out], e.g. {converted[0]}), which transformers' quantized loaders "
            "do not replace; export is not supported for it, use lowbit's own folder "
            "(lowbit eval/generate load it)"
        )
    layers = quantized_layers(model)
    if not layers:
        raise LowbitError(f"{src} has no quantized layers; nothing to export")
    return src, out, model, manifest, layers


def export_tensors(
    src: Path, per_layer: dict[str, dict[str, torch.Tensor]], model: nn.Module
) -> dict[str, torch.Tensor]:
    """The export's weights: ``src``'s float tensors (:func:`float_tensors`) plus each
    quantized layer's new tensors, named ``LAYER.TENSOR`` as transformers writes ``model``'s
    checkpoints (Mixtral's ``block_sparse_moe.experts.E.w1``:
    :func:`~lowbit.models.checkpoint_names.checkpoint_keys`)."""
    tensors = float_tensors(src, list(per_layer))
    for name, own in per_layer.items():
        tensors.update({f"{name}.{k}": v for k, v in own.items()})
    names = checkpoint_keys(model, list(tensors))
    return {names[k]: v for k, v in tensors.items()}


def float_tensors(src: Path, quantized: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor of ``src``'s weights file that does not belong to a quantized layer
    (embeddings, norms, untied LM head, and the quantized layers' biases)."""
    prefixes = tuple(f"{name}." for name in quantized)
    out = {}
    with safe_open(str(src / WEIGHTS), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            if not key.startswith(prefixes) or key.endswith(".bias"):
                out[key] = f.get_tensor(key)
    return out


def write_export(
    src: Path,
    out: Path,
    tensors: dict[str, torch.Tensor],
    quantization_config: dict[str, Any],
    provenance: dict[str, Any],
    extra_files: dict[str, str] | None = None,
    config_updates: dict[str, Any] | None = None,
) -> Path:
    """Write the export folder ``out`` atomically.

    Args:
        tensors: every tensor of the exported model, by checkpoint name.
        quantization_config: the target's ``config.json`` ``quantization_config``.
        provenance: stored as ``config.json`` key ``lowbit_export``.
        extra_files: file name -> text (e.g. GPTQ's ``quantize_config.json``).
        config_updates: other top-level ``config.json`` keys to set (e.g. ``dtype``).
    """
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    config[CONFIG_KEY] = provenance
    config.update(config_updates or {})
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for file in src.iterdir():
            if file.is_file() and file.name not in _REWRITTEN:
                shutil.copy2(file, tmp / file.name)
    return out
