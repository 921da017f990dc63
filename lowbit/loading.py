"""Loading a model by what the user names: a bundled name, a local Hugging Face folder or a
lowbit DIR, whole or streamed.

Below eval/ and infer/ (both load models by name) and above export/ (a lowbit DIR's reader)
and engine/ (a streamed model's block reader): docs/DESIGN.md, "Layers".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.data.tokens import tokenizer_adds_bos
from lowbit.engine.streaming import BlockStream, WeightIndex, load_streamed
from lowbit.errors import LowbitError
from lowbit.export import lowbit_format
from lowbit.models.arch import BlockTable
from lowbit.models.bundled import BUNDLED, prepare
from lowbit.models.convert import linear_layout
from lowbit.models.discovery import table_of


@dataclass
class LoadedModel:
    """A model ready to quantize or evaluate.

    Attributes:
        spec: what the user named (bundled name or path); a lowbit DIR's ``source`` is the spec
            of the model it was quantized from.
        manifest: the lowbit.json of a quantized DIR, else None.
        stream: for a model loaded with ``stream=True``: its decoder blocks are on the meta
            device and are read from disk one at a time when quantized; it can be quantized
            and saved, not run.
        dtype: the forward dtype the model was loaded in (a saved quantized model records it).
    """

    model: nn.Module
    tokenizer: Any
    table: BlockTable
    spec: str
    manifest: dict | None = None
    stream: BlockStream | None = None
    dtype: torch.dtype = torch.float32  # forward dtype: activations, unquantized weights

    @property
    def add_bos(self) -> bool:
        """Every calibration/evaluation window starts with BOS (the tokenizer adds one)."""
        return tokenizer_adds_bos(self.tokenizer)

    @property
    def source(self) -> str:
        return self.manifest["source_model"] if self.manifest else self.spec


def model_path(spec: str) -> Path:
    """The folder of a bundled name (prepared once) or of a local path."""
    if spec in BUNDLED:
        return prepare(spec)
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise LowbitError(
            f"unknown model or path '{spec}'; use a bundled model ({', '.join(BUNDLED)}) "
            "or a local Hugging Face folder with config.json"
        )
    return path


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def dtype_named(name: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype of ``name`` (float32, bfloat16, float16, or fp32/bf16/fp16); ``None``
    for ``None`` or ``auto`` (the checkpoint's own dtype)."""
    if name is None or isinstance(name, torch.dtype):
        if name is not None and name not in DTYPES.values():
            raise LowbitError(f"--dtype: {name} is not a forward dtype; use one of "
                              f"auto, {', '.join(DTYPES)}")
        return name
    key = str(name).removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key == "auto":
        return None
    if key not in DTYPES:
        raise LowbitError(f"--dtype: '{name}' is not a forward dtype; use one of auto, "
                          f"{', '.join(DTYPES)}")
    return DTYPES[key]


def checkpoint_dtype(path: Path) -> torch.dtype:
    """The dtype an HF folder's weights are stored in: its config's ``dtype`` (``torch_dtype``
    before transformers 5), else that of the first floating tensor of its safetensors files,
    else float32. A dtype lowbit does not run in (an fp8 checkpoint) gives float32."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if stored is None:
        try:
            index = WeightIndex.from_folder(path)
        except LowbitError:  # a .bin checkpoint: no header to read
            index = None
        names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
        floating = [s.dtype for s in index.specs.values() if s.dtype in names] if index else []
        stored = names[floating[0]] if floating else torch.float32
    return stored if stored in DTYPES.values() else torch.float32


def load_model(
    spec: str, dtype: torch.dtype | str | None = None, stream: bool = False
) -> LoadedModel:
    """Load a bundled name, a local HF causal-LM folder, or a lowbit DIR.

    ``dtype``: the forward dtype (a torch dtype or its name); ``None`` or ``"auto"``: the
    checkpoint's own (:func:`checkpoint_dtype`; a lowbit DIR: the dtype it was quantized in,
    float32 for folders written before it was recorded). A bf16 checkpoint loads as bf16, with
    no fp32 copy of its weights.

    ``stream``: build the model with its decoder blocks on the meta device, to be read from the
    safetensors files one at a time when it is quantized (:mod:`lowbit.engine.streaming`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(spec)
    dtype = dtype_named(dtype)
    if lowbit_format.is_lowbit_dir(path):
        if stream:
            raise LowbitError(f"{spec} is already quantized; stream the original model")
        if dtype is None:
            dtype = dtype_named(lowbit_format.read_manifest(path).get("dtype", "float32"))
        model, tokenizer, manifest = lowbit_format.load_quantized(path, dtype)
        return LoadedModel(model, tokenizer, table_of(model), spec, manifest, dtype=dtype)
    dtype = checkpoint_dtype(path) if dtype is None else dtype
    if stream:
        blocks = load_streamed(path, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return LoadedModel(blocks.model, tokenizer, blocks.table, spec, stream=blocks, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    linear_layout(model)  # fused experts, Conv1D: one nn.Linear per matrix
    table = table_of(model)
    return LoadedModel(model, AutoTokenizer.from_pretrained(path), table, spec, dtype=dtype)
