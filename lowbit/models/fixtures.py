"""Real models cut to their first few blocks: fast end-to-end checks on real weights."""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.models.bundled import prepare
from lowbit.models.discovery import find_structure


def truncated_copy(name: str, n_blocks: int, out_dir: str | Path) -> Path:
    """Save bundled model ``name`` with only its first ``n_blocks`` decoder blocks to ``out_dir``.

    The result is a plain HF folder (config, safetensors, tokenizer) that loads anywhere a
    full model does; its config's per-layer lists (e.g. Gemma-3 ``layer_types``) are cut too.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    src = prepare(name)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    blocks = model.get_submodule(find_structure(model).blocks)
    del blocks[n_blocks:]
    model.config.num_hidden_layers = n_blocks
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n_blocks]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out
