"""The library's front door: load, quantize, save, reload, evaluate.

from lowbit import api
from lowbit.algorithms.gptq import GPTQConfig
loaded = api.load_model("smollm2-135m")
result = api.quantize(loaded, GPTQConfig(bits=4, group_size=64), api.CalibSpec())
api.save_quantized(loaded, result, "out/smollm2-w4")
scores = api.evaluate(api.load_model("out/smollm2-w4"), ppl=["austen-pp"], kld=True)

Streamed (the full-precision model never in memory at once; docs/RELIABILITY.md):
loaded = api.load_model("smollm2-135m", stream=True)
result = api.quantize(loaded, GPTQConfig(bits=4, group_size=64), api.CalibSpec(),
                      workdir="out/smollm2-w4.ckpt")
api.save_quantized(loaded, result, "out/smollm2-w4")
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lowbit
from lowbit.algorithms import config_class, methods
from lowbit.core.config import MethodConfig
from lowbit.core.method import Method, method_for
from lowbit.core.report import LayerReport
from lowbit.data.calibration import calibration_batch
from lowbit.data.corpora import load_text, text_sha256
from lowbit.data.tokens import tokenizer_adds_bos
from lowbit.engine import distributed
from lowbit.engine.guards import check_finite_weights
from lowbit.engine.model_context import CheckpointStore, ModelContext
from lowbit.engine.preflight import Estimate, RunShape, estimate
from lowbit.engine.resume import BlockCheckpoints, tensor_sha256
from lowbit.engine.sequential import quantize_sequential
from lowbit.engine.streaming import BlockStream, WeightIndex, load_streamed
from lowbit.errors import LowbitError
from lowbit.eval.kld import kl_divergence
from lowbit.eval.perplexity import perplexity
from lowbit.eval.windows import eval_windows
from lowbit.export import lowbit_format
from lowbit.memory import process_peak_rss_mb
from lowbit.models.arch import BlockTable, get_blocks, table_for
from lowbit.models.bundled import BUNDLED, prepare


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
        return LoadedModel(model, tokenizer, table_for(model.config.model_type), spec, manifest)
    if stream:
        blocks = load_streamed(path, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return LoadedModel(blocks.model, tokenizer, blocks.table, spec, stream=blocks)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    table = table_for(model.config.model_type)
    model.eval()
    return LoadedModel(model, AutoTokenizer.from_pretrained(path), table, spec)


@dataclass(frozen=True)
class CalibSpec:
    """Calibration data: ``nsamples`` random windows of ``seqlen`` tokens of ``corpus``,
    drawn with ``seed`` (see :func:`lowbit.data.calibration.calibration_batch`)."""

    corpus: str = "austen-emma"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8


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


def build_config(method: str, settings: dict[str, Any]) -> MethodConfig:
    """The config of the method named ``method`` from recipe keys / flags (unknown keys are an
    error naming them)."""
    return config_class(method).from_dict({"method": method, **settings})


def as_config(config: MethodConfig | dict[str, Any]) -> MethodConfig:
    """``config`` itself, or the config of a recipe entry ``{"method": name, key: value, ...}``."""
    if isinstance(config, MethodConfig):
        return config
    if not isinstance(config, dict) or not isinstance(config.get("method"), str):
        raise LowbitError(
            "a config is a method config (e.g. GPTQConfig(bits=4)) or a recipe entry "
            f"{{'method': name, ...}}; got {config!r}"
        )
    settings = dict(config)
    return build_config(settings.pop("method"), settings)


def quantize(
    loaded: LoadedModel,
    config: MethodConfig | dict[str, Any],
    calib: CalibSpec,
    progress: bool = True,
    workdir: str | Path | None = None,
    resume: bool = False,
) -> QuantizeResult:
    """Quantize ``loaded.model`` in place with the method registered for ``type(config)``
    (``config``: a method config, or a recipe entry ``{"method": name, ...}``): block by block,
    or as a whole for whole-model methods (training). Both keep resumable state in
    ``workdir`` (none if ``None``): per finished block (:mod:`lowbit.engine.resume`), or
    training checkpoints; ``resume`` continues from it (an existing state without
    ``resume`` is an error).

    A streamed model (``load_model(..., stream=True)``) is quantized block by block from disk;
    its quantized blocks stay in ``workdir`` (required) until :func:`save_quantized`.
    """
    if loaded.manifest is not None:
        raise LowbitError(f"{loaded.spec} is already quantized; quantize the original model")
    config = as_config(config)
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
        ctx = _model_context(loaded, calib, calib_ids, workdir, resume, progress)
        reports, extra = registered.apply_model(config, ctx)
    else:
        ids = calib_ids()
        if distributed.rank_and_world()[1] > 1:
            ids, store = _distributed_share(registered, ids, resume), None
        else:
            store = _block_checkpoints(
                loaded, config, calib, text, ids, workdir, resume, weights_sha256
            )
        reports = quantize_sequential(
            loaded.model, loaded.table, ids, registered, config, calib.batch_size, progress, store,
            loaded.stream,
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


def _check_streamable(loaded: LoadedModel, method: Method, workdir: str | Path | None) -> None:
    """A streamed model needs a block-wise method, one process, and a folder for its
    quantized blocks."""
    if loaded.stream is None:
        return
    _refuse_streaming(method)
    if distributed.rank_and_world()[1] > 1:
        raise LowbitError("--stream runs in one process; run it without torchrun")
    if workdir is None:
        raise LowbitError(
            "a streamed run writes each quantized block to its checkpoint folder; pass "
            "workdir= (the CLI uses OUT.ckpt)"
        )
    if loaded.stream.checkpoints is not None:
        raise LowbitError(f"the streamed model {loaded.spec} is quantized already; load it again")


def _refuse_streaming(method: Method) -> None:
    if method.apply_model is not None:
        raise LowbitError(
            f"method '{method.name}' trains the whole model at once and cannot stream its "
            "blocks from disk; run it without --stream"
        )


def preflight(
    spec: str,
    config: MethodConfig,
    calib: CalibSpec,
    out: str | Path,
    stream: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Estimate | None:
    """Pre-flight estimate of the peak memory and the disk of quantizing ``spec`` into ``out``
    (from its files' headers: nothing is loaded; see :mod:`lowbit.engine.preflight`).
    ``None`` for a whole-model method (training), a lowbit DIR, or a model without safetensors
    files (when not streamed: a streamed run needs them and says so)."""
    from transformers import AutoConfig

    registered = method_for(config)
    if stream:
        _refuse_streaming(registered)
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
    run = RunShape(
        calib.nsamples, calib.seqlen, calib.batch_size, registered.group_blocks(config),
        config.estimated_bits(), stream,
    )
    return estimate(index, hf_config, table_for(hf_config.model_type), run, out, dtype)


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
    try:
        return distributed.shard(ids)
    except ValueError as exc:
        raise LowbitError(str(exc)) from None


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


def _model_context(loaded, calib, calib_ids, workdir, resume, progress) -> ModelContext:
    """The services a whole-model method gets: PTQ on the calibration data, token windows of
    any corpus, a checkpoint folder."""

    def ptq(config: MethodConfig) -> list[LayerReport]:
        return quantize_sequential(
            loaded.model, loaded.table, calib_ids(), method_for(config), config,
            calib.batch_size, progress,
        )

    def windows(corpus: str, n: int, seqlen: int, seed: int) -> tuple[torch.Tensor, str]:
        text = load_text(corpus)
        ids = calibration_batch(loaded.tokenizer, text, n, seqlen, seed, loaded.add_bos)
        return ids, text_sha256(text)

    store = None if workdir is None else CheckpointStore(workdir, resume)
    return ModelContext(loaded.model, loaded.table, loaded.add_bos, ptq, windows, store, progress)


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


def save_quantized(loaded: LoadedModel, result: QuantizeResult, out_dir: str | Path) -> Path:
    """Write the quantized model and its manifest (see :mod:`lowbit.export.lowbit_format`);
    a streamed model's quantized blocks are read back from its checkpoint folder one at a
    time."""
    offloaded = _offloaded(loaded)
    manifest = {
        "lowbit_version": lowbit.__version__,
        "method": result.method,
        "recipe": [result.config.to_dict()],
        "source_model": loaded.spec,
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
        "lowbit": lowbit.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def evaluate(
    loaded: LoadedModel,
    ppl: list[str] = ("austen-pp",),
    kld: bool = False,
    base: LoadedModel | None = None,
    seqlen: int = 512,
    max_tokens: int | None = None,
    kld_corpus: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity on each corpus and, with ``kld``, KL(base || model) on the first corpus.

    Returns ``{"ppl": {corpus: value}, "kld": value | None, "top1_agreement": ..., ...}``.
    """
    if loaded.stream is not None:
        raise LowbitError(
            "a streamed model keeps its blocks on disk and cannot be run; save it "
            "(save_quantized) and evaluate the saved folder"
        )
    start = time.perf_counter()
    out: dict[str, Any] = {"ppl": {}, "eval_tokens": {}, "kld": None}
    add_bos = loaded.add_bos
    kld_corpus = (kld_corpus or (ppl[0] if ppl else "austen-pp")) if kld else None
    if kld:
        if base is None:
            base = load_model(loaded.source)
        windows = eval_windows(loaded.tokenizer, load_text(kld_corpus), seqlen, max_tokens, add_bos)
        result = kl_divergence(base.model, loaded.model, windows, progress=progress)
        out.update(kld=result.kld_mean, kld_corpus=kld_corpus, top1_agreement=result.top1_agreement)
    for corpus in ppl:
        if corpus == kld_corpus:  # same windows, same logits: reuse the KLD pass
            out["ppl"][corpus], out["eval_tokens"][corpus] = result.model_ppl, result.tokens
            continue
        windows = eval_windows(loaded.tokenizer, load_text(corpus), seqlen, max_tokens, add_bos)
        scored = perplexity(loaded.model, windows, progress=progress)
        out["ppl"][corpus], out["eval_tokens"][corpus] = scored.ppl, scored.tokens
    out["seconds"] = time.perf_counter() - start
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (:mod:`lowbit.memory`)."""
    return process_peak_rss_mb()
