"""lowbit's checkpoint: a Hugging Face folder whose quantized linears are stored packed.

A quantized DIR holds:
- ``config.json``: the model config with ``quantization_config`` (``quant_method: lowbit``);
- ``model.safetensors``: every tensor of the model; a quantized linear ``NAME`` is stored as
  its packed tensors ``NAME.qweight``, ``NAME.scales``, ... instead of ``NAME.weight``;
- ``lowbit.json`` (versioned): method, recipe, per-layer stored-weight descriptions and
  metrics, average bits, calibration data hash, library versions;
- the tokenizer files.
The folder is written to a temporary sibling and renamed into place, so a crash never leaves a
half-written DIR that looks finished. ``lowbit.json`` records the size and sha256 of every other
file and is sealed with its own checksum (:mod:`lowbit.export.integrity`); loading checks them,
so a truncated, corrupt or edited file is an error naming it, never different weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.atomic import atomic_dir
from lowbit.errors import LowbitError, write_error
from lowbit.export import integrity
from lowbit.export.safetensors_stream import StreamedSafetensors
from lowbit.models.arch import BlockTable, set_submodule
from lowbit.models.convert import linear_layout
from lowbit.models.discovery import table_of
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


@dataclass(frozen=True)
class OffloadedBlock:
    """A quantized decoder block kept on disk by a streamed run.

    Attributes:
        prefix: its dotted path with a trailing dot (``model.layers.3.``).
        open: ``with open() as block:`` the block module, read back from disk for as long as
            the context lasts.
    """

    prefix: str
    open: Callable[[], AbstractContextManager[nn.Module]]


def save_quantized(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    manifest: dict[str, Any],
    offloaded: Sequence[OffloadedBlock] = (),
) -> Path:
    """Write ``model`` (with QuantLinear layers) as a lowbit DIR, atomically.

    ``manifest`` holds the run description (method, recipe, metrics, ...); the per-layer
    stored-weight descriptions and the format version are added here. ``offloaded`` blocks
    (a streamed run's, on the meta device in ``model``) are read back one at a time, and the
    weights file is written in two passes (:mod:`lowbit.export.safetensors_stream`): the bytes
    are those the in-memory model would give.
    """
    out = Path(out_dir)
    check_output_dir(out)
    try:
        with atomic_dir(out) as tmp:
            layers, acts = _write_weights(model, offloaded, tmp / WEIGHTS)
            _write_files(model, tokenizer, tmp, _complete(manifest, layers, acts))
    except OSError as exc:
        raise write_error(
            out, exc, "the partial folder was removed and an earlier output there is unchanged"
        ) from exc
    return out


def _complete(
    manifest: dict[str, Any], layers: dict[str, dict], acts: set[str]
) -> dict[str, Any]:
    """The manifest with the format version, each quantized linear's stored-weight description
    (merged with its metrics) and the activation formats."""
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    metrics = manifest.get("layers", {})
    manifest["layers"] = {n: {**entry, **metrics.get(n, {})} for n, entry in layers.items()}
    if acts:
        manifest["activations"] = {"quantized": sorted(acts), "execution_cpu": SIMULATED}
    return manifest


def _write_weights(
    model: nn.Module, offloaded: Sequence[OffloadedBlock], path: Path
) -> tuple[dict[str, dict], set[str]]:
    """Write every tensor of ``model`` (and of the ``offloaded`` blocks) to ``path``; the
    manifest entries of the quantized linears and their activation formats."""
    prefixes = tuple(part.prefix for part in offloaded)
    layers = {n: q for n, q in quantized_layers(model).items() if not n.startswith(prefixes)}
    entries, acts = _layer_entries(layers)
    rest = _unique_state_dict(model, skip=prefixes)
    if not offloaded:
        save_file(rest, str(path), metadata={"format": "pt"})
        return entries, acts
    writer = StreamedSafetensors({"format": "pt"})
    writer.add(rest)
    for part in offloaded:
        with part.open() as block:
            writer.add(_unique_state_dict(block, prefix=part.prefix))
            more, more_acts = _layer_entries(quantized_layers(block), part.prefix)
            entries.update(more)
            acts |= more_acts
    writer.open(path)
    writer.write(rest)
    for part in offloaded:
        with part.open() as block:
            writer.write(_unique_state_dict(block, prefix=part.prefix))
    writer.close()
    return entries, acts


def _layer_entries(
    layers: dict[str, QuantLinear], prefix: str = ""
) -> tuple[dict[str, dict], set[str]]:
    """Manifest entries (stored-weight and add-on descriptions) of ``layers``, and the set of
    their activation formats."""
    entries = {prefix + n: {"weight": q.weight_meta, **q.addon_meta()} for n, q in layers.items()}
    acts = {q.act_quant.describe() for q in layers.values() if q.act_quant is not None}
    return entries, acts


def _write_files(model: nn.Module, tokenizer, folder: Path, manifest: dict[str, Any]) -> None:
    """Config, tokenizer, then the manifest sealed over them and the weights."""
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "lowbit",
        "format_version": FORMAT_VERSION,
        "method": manifest.get("method"),
        "avg_bits": manifest.get("avg_bits"),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    sealed = integrity.seal(manifest, folder, MANIFEST)
    (folder / MANIFEST).write_text(json.dumps(sealed, indent=2))


def _unique_state_dict(
    model: nn.Module, prefix: str = "", skip: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """State dict (names prefixed with ``prefix``, names starting with one of ``skip`` left
    out) without tied duplicates (e.g. lm_head.weight tied to the embeddings)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        if skip and name.startswith(skip):
            continue
        key = tensor.data_ptr()
        if key in seen and tensor.numel():
            continue
        seen.add(key)
        out[prefix + name] = tensor.contiguous()
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise LowbitError(f"{path} is not a lowbit output (no {MANIFEST}); quantize it first")
    try:
        manifest = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LowbitError(
            f"{p} is not valid JSON ({exc}); the folder is damaged, re-quantize"
        ) from exc
    if not isinstance(manifest, dict):
        raise LowbitError(f"{p} is not a JSON object; the folder is damaged, re-quantize")
    integrity.check_seal(manifest, p)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LowbitError(
            f"{p} has format version {manifest.get('format_version')}; this lowbit reads "
            f"version {FORMAT_VERSION}"
        )
    return manifest


def load_quantized(
    path: str | Path, dtype: torch.dtype = torch.float32, verify: str = "sha256"
) -> tuple[nn.Module, Any, dict]:
    """Load a lowbit DIR: (model with QuantLinear layers, tokenizer, manifest).

    ``verify``: ``"sha256"`` (default) checks every file's size and sha256 against
    ``lowbit.json`` before reading it; ``"size"`` checks sizes only (skips one read of the
    files; a flipped byte inside a tensor then goes unnoticed). Any damage found is a
    LowbitError naming the file.
    """
    from transformers import AutoModelForCausalLM

    if verify not in ("sha256", "size"):
        raise LowbitError(f"verify must be 'sha256' or 'size', got {verify!r}")
    path = Path(path)
    manifest = read_manifest(path)
    integrity.verify_files(path, manifest, hashes=verify == "sha256")
    config = _read_config(path)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError, TypeError) as exc:
        raise _damaged(path / "config.json", exc) from exc
    linear_layout(model)  # as at quantization: saved names are those of the converted model
    table = table_of(model) if dtype != torch.float32 else None
    tensors = _read_tensors(path / WEIGHTS)
    _install_layers(model, manifest, tensors, path)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise _damaged(path / WEIGHTS, exc) from exc
    missing = [k for k in missing if not _is_quant_buffer(model, k)]
    if table is not None:
        _offset_norms_in_fp32(model, table, tensors)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise LowbitError(
            f"{path / WEIGHTS} does not match its config (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); the folder is damaged, re-quantize"
        )
    model.eval()
    return model, _read_tokenizer(path), manifest


def _offset_norms_in_fp32(model: nn.Module, table: BlockTable, tensors: dict) -> None:
    """Hold the block norms that multiply by ``offset + w`` (Gemma's ``1 + w``) in fp32.

    SmoothQuant and QLLM fold divisors ``s`` into them as ``w' = (1 + w) / s - 1``; in bf16
    that subtraction cancels (a gain ``1 + w'`` of 1e-3 rounds to 0). These norms compute in
    fp32 and cast their output to the input's dtype, so an fp32 weight costs nothing else.
    """
    if table.norm_gain_offset == 0:
        return
    for i, block in enumerate(model.get_submodule(table.blocks)):
        for norm, _linears in table.norm_feeds:
            key = f"{table.blocks}.{i}.{norm}.weight"
            if key in tensors:
                block.get_submodule(norm).weight = nn.Parameter(tensors[key].float(),
                                                                requires_grad=False)


def _damaged(file: Path, exc: BaseException) -> LowbitError:
    """LowbitError for a file that could not be parsed; the cause on one line, cut at 300
    characters."""
    cause = " ".join(line.strip() for line in str(exc).splitlines()) or type(exc).__name__
    cause = cause if len(cause) <= 300 else cause[:297] + "..."
    return LowbitError(f"{file} cannot be read ({cause}); the folder is damaged, re-quantize")


def _read_config(path: Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _damaged(path / "config.json", exc) from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a bad header or data is a LowbitError."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _damaged(file, exc) from exc


def _read_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _damaged(path / "tokenizer files", exc) from exc


def _install_layers(
    model: nn.Module, manifest: dict, tensors: dict[str, torch.Tensor], path: Path
) -> None:
    """Replace each linear listed in the manifest by a QuantLinear built from its stored
    tensors, which are taken out of ``tensors`` (what remains is the float part)."""
    layers = manifest.get("layers")
    if not isinstance(layers, dict):
        raise LowbitError(f"{path / MANIFEST} has no 'layers' mapping; the folder is damaged")
    for name, layer in layers.items():
        prefix = f"{name}."
        keys = [k for k in tensors if k.startswith(prefix)]
        own = {k[len(prefix) :]: tensors.pop(k) for k in keys}
        if not own:
            raise LowbitError(
                f"layer {name} is listed in {MANIFEST} but {WEIGHTS} has no tensors for it; "
                "the folder is damaged, re-quantize"
            )
        bias = own.pop("bias", None)
        try:
            module = QuantLinear.from_stored(layer, own, bias)
            set_submodule(model, name, module)
        except KeyError as exc:
            raise LowbitError(
                f"layer {name}: tensor or field {exc} is missing from {WEIGHTS} or its "
                f"{MANIFEST} entry; the folder is damaged, re-quantize"
            ) from exc
        except (ValueError, TypeError, RuntimeError, AttributeError, IndexError) as exc:
            raise _damaged(path / WEIGHTS, exc) from exc


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
