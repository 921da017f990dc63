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
from lowbit.engine.streaming import BlockStream, load_streamed
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
    """

    model: nn.Module
    tokenizer: Any
    table: BlockTable
    spec: str
    manifest: dict | None = None
    stream: BlockStream | None = None

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


def load_model(spec: str, dtype: torch.dtype = torch.float32, stream: bool = False) -> LoadedModel:
    """Load a bundled name, a local HF causal-LM folder, or a lowbit DIR.

    ``stream``: build the model with its decoder blocks on the meta device, to be read from the
    safetensors files one at a time when it is quantized (:mod:`lowbit.engine.streaming`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(spec)
    if lowbit_format.is_lowbit_dir(path):
        if stream:
            raise LowbitError(f"{spec} is already quantized; stream the original model")
        model, tokenizer, manifest = lowbit_format.load_quantized(path, dtype)
        return LoadedModel(model, tokenizer, table_of(model), spec, manifest)
    if stream:
        blocks = load_streamed(path, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return LoadedModel(blocks.model, tokenizer, blocks.table, spec, stream=blocks)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    linear_layout(model)  # fused experts, Conv1D: one nn.Linear per matrix
    table = table_of(model)
    return LoadedModel(model, AutoTokenizer.from_pretrained(path), table, spec)
