"""The pre-flight estimate of a quantization run: its peak memory and the disk it writes,
from the model files' headers before anything is loaded (:mod:`lowbit.engine.preflight`)."""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.core.config import MethodConfig
from lowbit.core.method import method_for
from lowbit.engine.preflight import Estimate, RunShape, estimate
from lowbit.engine.streaming import WeightIndex
from lowbit.errors import LowbitError
from lowbit.export import lowbit_format
from lowbit.loading import checkpoint_dtype, dtype_named, model_path
from lowbit.models.discovery import names_table
from lowbit.pipeline.configs import CalibSpec
from lowbit.pipeline.quantizing import refuse_streaming


def preflight(
    spec: str,
    config: MethodConfig,
    calib: CalibSpec,
    out: str | Path,
    stream: bool = False,
    dtype: torch.dtype | str | None = None,
) -> Estimate | None:
    """Pre-flight estimate of the peak memory and the disk of quantizing ``spec`` into ``out``
    (from its files' headers: nothing is loaded; see :mod:`lowbit.engine.preflight`).
    ``None`` for a whole-model method (training), a lowbit DIR, or a model without safetensors
    files (when not streamed: a streamed run needs them and says so)."""
    from transformers import AutoConfig

    registered = method_for(config)
    if stream:
        refuse_streaming(registered)
    path = model_path(spec)
    if registered.apply_model is not None or lowbit_format.is_lowbit_dir(path):
        return None
    try:
        index = WeightIndex.from_folder(path)
    except LowbitError:
        if stream:
            raise
        return None
    hf_config = AutoConfig.from_pretrained(path)
    dtype = dtype_named(dtype) or checkpoint_dtype(path)  # as load_model will load it
    run = RunShape(
        calib.nsamples, calib.seqlen, calib.batch_size, registered.group_blocks(config),
        config.estimated_bits(), stream,
    )
    return estimate(index, hf_config, names_table(hf_config), run, out, dtype)
