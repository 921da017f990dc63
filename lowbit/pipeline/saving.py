"""Writing a quantized model with its manifest: method, recipe, calibration, per-layer
metrics, library versions (the format: :mod:`lowbit.export.lowbit_format`)."""

from __future__ import annotations

import dataclasses
import functools
import platform
from pathlib import Path

import torch

from lowbit._version import __version__
from lowbit.errors import LowbitError
from lowbit.export import lowbit_format
from lowbit.loading import LoadedModel
from lowbit.pipeline.quantizing import QuantizeResult


def save_quantized(loaded: LoadedModel, result: QuantizeResult, out_dir: str | Path) -> Path:
    """Write the quantized model and its manifest (see :mod:`lowbit.export.lowbit_format`);
    a streamed model's quantized blocks are read back from its checkpoint folder one at a
    time."""
    offloaded = _offloaded(loaded)
    manifest = {
        "lowbit_version": __version__,
        "method": result.method,
        "recipe": [result.config.to_dict()],
        "source_model": loaded.spec,
        "dtype": str(loaded.dtype).removeprefix("torch."),  # the forward dtype; loads back in it
        "avg_bits": result.avg_bits,
        "avg_bits_scope": "quantized linears (embeddings and LM head kept in full precision)",
        "calibration": {**dataclasses.asdict(result.calib), "sha256": result.calib_sha256},
        "seconds": result.seconds,
        "versions": _versions(),
        "layers": {r.name: {"metrics": r.to_dict()} for r in result.layers},
        **result.extra,
    }
    return lowbit_format.save_quantized(
        loaded.model, loaded.tokenizer, out_dir, manifest, offloaded
    )


def _offloaded(loaded: LoadedModel) -> list[lowbit_format.OffloadedBlock]:
    """A streamed model's quantized blocks, read back from its checkpoint folder."""
    stream = loaded.stream
    if stream is None:
        return []
    if stream.checkpoints is None:
        raise LowbitError(f"the streamed model {loaded.spec} is not quantized yet; quantize it")
    return [
        lowbit_format.OffloadedBlock(
            stream.block_prefix(i), functools.partial(stream.quantized_block, i)
        )
        for i in range(len(stream.blocks))
    ]


def _versions() -> dict[str, str]:
    import safetensors
    import transformers

    return {
        "lowbit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
