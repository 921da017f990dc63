"""lowbit's checkpoint: a Hugging Face folder whose quantized linears are stored packed.

A quantized DIR holds:
- ``config.json``: the model config with ``quantization_config`` (``quant_method: lowbit``);
- ``model.safetensors``: every tensor of the model; a quantized linear ``NAME`` is stored as
  its packed tensors ``NAME.qweight``, ``NAME.scales``, ... instead of ``NAME.weight``;
- ``lowbit.json`` (versioned): method, recipe, per-layer stored-weight descriptions and
  metrics, average bits, calibration data hash, library versions;
- the tokenizer files.
The folder is written to a temporary sibling and renamed into place, so a crash never leaves a
half-written DIR that looks finished.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.atomic import atomic_dir
from lowbit.errors import LowbitError
from lowbit.models.arch import set_submodule
from lowbit.nn.act_quant import SIMULATED
from lowbit.nn.quant_linear import QuantLinear

FORMAT_VERSION = 1
MANIFEST = "lowbit.json"
WEIGHTS = "model.safetensors"


def is_lowbit_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def check_output_dir(out_dir: str | Path) -> None:
    """LowbitError unless ``out_dir`` is absent, empty, or an earlier lowbit output."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LowbitError(f"output path {out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_lowbit_dir(out):
        raise LowbitError(
            f"output folder {out} exists and is not a lowbit output; choose another --out "
            "or remove it"
        )


def save_quantized(
    model: nn.Module, tokenizer, out_dir: str | Path, manifest: dict[str, Any]
) -> Path:
    """Write ``model`` (with QuantLinear layers) as a lowbit DIR, atomically.

    ``manifest`` holds the run description (method, recipe, metrics, ...); the per-layer
    stored-weight descriptions and the format version are added here.
    """
    out = Path(out_dir)
    check_output_dir(out)
    layers = quantized_layers(model)
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["layers"] = {
        name: {
            "weight": q.weight_meta,
            **q.addon_meta(),
            **manifest.get("layers", {}).get(name, {}),
        }
        for name, q in layers.items()
    }
    acts = sorted({q.act_quant.describe() for q in layers.values() if q.act_quant is not None})
    if acts:
        manifest["activations"] = {"quantized": acts, "execution_cpu": SIMULATED}
    with atomic_dir(out) as tmp:
        save_file(_unique_state_dict(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = model.config.to_dict()
        config["quantization_config"] = {
            "quant_method": "lowbit",
            "format_version": FORMAT_VERSION,
            "method": manifest.get("method"),
            "avg_bits": manifest.get("avg_bits"),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (e.g. lm_head.weight tied to the embeddings)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel():
            continue
        seen.add(key)
        out[name] = tensor.contiguous()
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise LowbitError(f"{path} is not a lowbit output (no {MANIFEST}); quantize it first")
    try:
        manifest = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise LowbitError(
            f"{p} is not valid JSON ({exc}); the folder is damaged, re-quantize"
        ) from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LowbitError(
            f"{p} has format version {manifest.get('format_version')}; this lowbit reads "
            f"version {FORMAT_VERSION}"
        )
    return manifest


def load_quantized(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any, dict]:
    """Load a lowbit DIR: (model with QuantLinear layers, tokenizer, manifest)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for name, layer in manifest["layers"].items():
        prefix = f"{name}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        bias = own.pop("bias", None)
        set_submodule(model, name, QuantLinear.from_stored(layer, own, bias))
        for k in list(tensors):
            if k.startswith(prefix):
                del tensors[k]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not _is_quant_buffer(model, k)]
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise LowbitError(
            f"{path / WEIGHTS} does not match its config (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); the folder is damaged, re-quantize"
        )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, manifest


def _is_quant_buffer(model: nn.Module, key: str) -> bool:
    """Whether ``key`` is a buffer of a QuantLinear or of one of its add-ons."""
    parts = key.split(".")[:-1]
    for end in range(len(parts), 0, -1):
        try:
            if isinstance(model.get_submodule(".".join(parts[:end])), QuantLinear):
                return True
        except AttributeError:
            return False
    return False
