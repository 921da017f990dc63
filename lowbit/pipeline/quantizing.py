"""Quantizing a loaded model: block by block (whole in memory, streamed from disk, resumable
from per-block checkpoints, or sharded over torchrun processes) or as a whole for whole-model
methods (training), and the stored bits per weight of the result."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.algorithms import methods
from lowbit.core.config import MethodConfig
from lowbit.core.method import Method, method_for
from lowbit.core.report import LayerReport
from lowbit.data.calibration import calibration_batch
from lowbit.data.corpora import load_text, text_sha256
from lowbit.engine import distributed
from lowbit.engine.guards import check_finite_weights
from lowbit.engine.model_context import CheckpointStore, ModelContext
from lowbit.engine.resume import BlockCheckpoints, tensor_sha256
from lowbit.engine.sequential import quantize_sequential
from lowbit.errors import LowbitError, user_input
from lowbit.export import lowbit_format
from lowbit.loading import LoadedModel
from lowbit.models.arch import get_blocks
from lowbit.pipeline.configs import CalibSpec, as_config, as_device


@dataclass
class QuantizeResult:
    method: str
    config: MethodConfig
    calib: CalibSpec
    calib_sha256: str
    layers: list[LayerReport]
    avg_bits: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def quantize(
    loaded: LoadedModel,
    config: MethodConfig | dict[str, Any],
    calib: CalibSpec,
    progress: bool = True,
    workdir: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device | None = "auto",
) -> QuantizeResult:
    """Quantize ``loaded.model`` in place with the method registered for ``type(config)``
    (``config``: a method config, or a recipe entry ``{"method": name, ...}``): block by block,
    or as a whole for whole-model methods (training). Both keep resumable state in
    ``workdir`` (none if ``None``): per finished block (:mod:`lowbit.engine.resume`), or
    training checkpoints; ``resume`` continues from it (an existing state without
    ``resume`` is an error).

    A streamed model (``load_model(..., stream=True)``) is quantized block by block from disk;
    its quantized blocks stay in ``workdir`` (required) until :func:`save_quantized`.

    ``device`` (``auto``: CUDA when available, ``cpu``, ``cuda``, ``cuda:N``): where each block
    is calibrated and solved; the model stays in CPU memory (or on disk) and each block moves
    to the device and back (:mod:`lowbit.engine.sequential`). A whole-model method trains the
    whole model on the device and brings it back.
    """
    if loaded.manifest is not None:
        raise LowbitError(f"{loaded.spec} is already quantized; quantize the original model")
    config = as_config(config)
    device = as_device(device)
    registered = method_for(config)
    _check_streamable(loaded, registered, workdir)
    _check_shapes(loaded, config)
    weights_sha256 = _check_weights(loaded)
    text = load_text(calib.corpus)

    def calib_ids() -> torch.Tensor:
        return calibration_batch(
            loaded.tokenizer, text, calib.nsamples, calib.seqlen, calib.seed, loaded.add_bos
        )

    start = time.perf_counter()
    extra: dict[str, Any] = {}
    earlier = 0.0  # seconds spent by an interrupted run this one resumes
    if registered.apply_model is not None:
        ctx = _model_context(loaded, calib, calib_ids, workdir, resume, progress, device)
        reports, extra = registered.apply_model(config, ctx)
    else:
        world = distributed.rank_and_world()[1]
        calibrated = registered.needs_calibration(config) or world > 1  # RTN: no tokens
        ids = calib_ids() if calibrated else torch.empty(0, calib.seqlen, dtype=torch.long)
        if world > 1:
            ids, store = _distributed_share(registered, ids, resume), None
        else:
            store = _block_checkpoints(
                loaded, config, calib, text, ids, workdir, resume, weights_sha256
            )
        reports = quantize_sequential(
            loaded.model, loaded.table, ids, registered, config, calib.batch_size, progress, store,
            loaded.stream, calib.all_experts, device,
        )
        earlier = store.earlier_seconds if store is not None else 0.0
    seconds = earlier + time.perf_counter() - start
    if loaded.stream is not None:
        loaded.stream.checkpoints = store
        avg_bits = _average_bits(list(loaded.stream.layers.values()))
    else:
        avg_bits = average_bits(loaded.model)
    return QuantizeResult(
        registered.name, config, calib, text_sha256(text), reports, avg_bits, seconds, extra
    )


def refuse_streaming(method: Method) -> None:
    """LowbitError for a whole-model method asked to stream its blocks from disk."""
    if method.apply_model is not None:
        raise LowbitError(
            f"method '{method.name}' trains the whole model at once and cannot stream its "
            "blocks from disk; run it without --stream"
        )


def _check_streamable(loaded: LoadedModel, method: Method, workdir: str | Path | None) -> None:
    """A streamed model needs a block-wise method, one process, and a folder for its
    quantized blocks."""
    if loaded.stream is None:
        return
    refuse_streaming(method)
    if distributed.rank_and_world()[1] > 1:
        raise LowbitError("--stream runs in one process; run it without torchrun")
    if workdir is None:
        raise LowbitError(
            "a streamed run writes each quantized block to its checkpoint folder; pass "
            "workdir= (the CLI uses OUT.ckpt)"
        )
    if loaded.stream.checkpoints is not None:
        raise LowbitError(f"the streamed model {loaded.spec} is quantized already; load it again")


def _check_weights(loaded: LoadedModel) -> str | None:
    """Refuse weights with NaN or Inf. A streamed model is read from disk for that, a block
    at a time, and its weights' sha256 (a checkpoint's fingerprint) is returned on the way."""
    if loaded.stream is not None:
        return loaded.stream.scan()
    check_finite_weights(loaded.model)
    return None


def _distributed_share(registered: Method, ids: torch.Tensor, resume: bool) -> torch.Tensor:
    """This process's calibration windows under torchrun (no checkpoints there)."""
    if not registered.distributed:
        able = sorted(name for name, m in methods().items() if m.distributed)
        raise LowbitError(
            f"method '{registered.name}' runs in one process; under torchrun use one of: "
            f"{', '.join(able)}"
        )
    if resume:
        raise LowbitError("--resume is for single-process runs; run without torchrun to resume")
    with user_input("--nsamples"):  # the message says the fix
        return distributed.shard(ids)


def _block_checkpoints(
    loaded: LoadedModel,
    config: MethodConfig,
    calib: CalibSpec,
    text: str,
    ids: torch.Tensor,
    workdir: str | Path | None,
    resume: bool,
    weights_sha256: str | None,
) -> BlockCheckpoints | None:
    """Per-block checkpoints in ``workdir``, fingerprinted by everything the result depends
    on: method settings, calibration (spec, text, tokens) and the model's weights (their
    sha256, given for a streamed model, the same value either way)."""
    if workdir is None:
        return None
    weights_sha256 = weights_sha256 or tensor_sha256(loaded.model.state_dict())
    run = {
        "config": config.to_dict(),
        "calibration": {
            **dataclasses.asdict(calib),
            "text_sha256": text_sha256(text),
            "tokens_sha256": tensor_sha256({"ids": ids}),
        },
        "model": {
            "type": loaded.model.config.model_type,
            "weights_sha256": weights_sha256,
        },
    }
    return BlockCheckpoints(CheckpointStore(workdir, resume), run)


def _model_context(loaded, calib, calib_ids, workdir, resume, progress, device) -> ModelContext:
    """The services a whole-model method gets: PTQ on the calibration data, token windows of
    any corpus, a checkpoint folder."""

    def ptq(config: MethodConfig) -> list[LayerReport]:
        return quantize_sequential(
            loaded.model, loaded.table, calib_ids(), method_for(config), config,
            calib.batch_size, progress, all_experts=calib.all_experts, device=device,
        )

    def windows(corpus: str, n: int, seqlen: int, seed: int) -> tuple[torch.Tensor, str]:
        text = load_text(corpus)
        ids = calibration_batch(loaded.tokenizer, text, n, seqlen, seed, loaded.add_bos)
        return ids, text_sha256(text)

    store = None if workdir is None else CheckpointStore(workdir, resume)
    return ModelContext(
        loaded.model, loaded.table, loaded.add_bos, ptq, windows, store, progress, device
    )


def _check_shapes(loaded: LoadedModel, config: MethodConfig) -> None:
    """Settings the model's layer shapes rule out, before any calibration
    (``config.check_shapes``: a group size that does not divide a width, a rank above a
    layer's smaller side)."""
    blocks = get_blocks(loaded.model, loaded.table)
    config.check_shapes({
        f"{loaded.table.blocks}.{i}.{n}": _shape(block.get_submodule(n))
        for i, block in enumerate(blocks)
        for n in loaded.table.linear_names
    })


def _shape(linear: nn.Module) -> tuple[int, int]:
    return linear.out_features, linear.in_features


def average_bits(model: nn.Module) -> float:
    """Stored bits per weight over all quantized linears (embeddings and head excluded)."""
    layers = lowbit_format.quantized_layers(model).values()
    return _average_bits([(q.bits_per_weight(), q.in_features, q.out_features) for q in layers])


def _average_bits(layers: list[tuple[float, int, int]]) -> float:
    """Weighted mean of ``(bits per weight, in_features, out_features)``; 16 when empty."""
    numel = sum(i * o for _, i, o in layers)
    if not numel:
        return 16.0
    return sum(b * i * o for b, i, o in layers) / numel
