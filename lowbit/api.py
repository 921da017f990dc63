"""The library's front door: load, quantize, save, reload, evaluate.

from lowbit import api
loaded = api.load_model("smollm2-135m")
result = api.quantize(loaded, "gptq", {"bits": 4, "group_size": 64}, api.CalibSpec())
api.save_quantized(loaded, result, "out/smollm2-w4")
scores = api.evaluate(api.load_model("out/smollm2-w4"), ppl=["austen-pp"], kld=True)
"""

from __future__ import annotations

import dataclasses
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lowbit
from lowbit.algorithms.base import METHODS, LayerReport, MethodConfig, get_method
from lowbit.data.calibration import calibration_batch
from lowbit.data.corpora import load_text, text_sha256
from lowbit.data.tokens import tokenizer_adds_bos
from lowbit.engine import distributed
from lowbit.engine.guards import check_finite_weights
from lowbit.engine.model_context import CheckpointStore, ModelContext
from lowbit.engine.resume import BlockCheckpoints, tensor_sha256
from lowbit.engine.sequential import quantize_sequential
from lowbit.errors import LowbitError
from lowbit.eval.kld import kl_divergence
from lowbit.eval.perplexity import perplexity
from lowbit.eval.windows import eval_windows
from lowbit.export import lowbit_format
from lowbit.models.arch import BlockTable, get_blocks, table_for
from lowbit.models.bundled import BUNDLED, prepare


@dataclass
class LoadedModel:
    """A model ready to quantize or evaluate.

    Attributes:
        spec: what the user named (bundled name or path); a lowbit DIR's ``source`` is the spec
            of the model it was quantized from.
        manifest: the lowbit.json of a quantized DIR, else None.
    """

    model: nn.Module
    tokenizer: Any
    table: BlockTable
    spec: str
    manifest: dict | None = None

    @property
    def add_bos(self) -> bool:
        """Every calibration/evaluation window starts with BOS (the tokenizer adds one)."""
        return tokenizer_adds_bos(self.tokenizer)

    @property
    def source(self) -> str:
        return self.manifest["source_model"] if self.manifest else self.spec


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a bundled name, a local HF causal-LM folder, or a lowbit DIR."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec in BUNDLED:
        path = prepare(spec)
    else:
        path = Path(spec)
        if not (path / "config.json").is_file():
            raise LowbitError(
                f"unknown model or path '{spec}'; use a bundled model ({', '.join(BUNDLED)}) "
                "or a local Hugging Face folder with config.json"
            )
    if lowbit_format.is_lowbit_dir(path):
        model, tokenizer, manifest = lowbit_format.load_quantized(path, dtype)
        return LoadedModel(model, tokenizer, table_for(model.config.model_type), spec, manifest)
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
    """The method's config from recipe keys / flags (unknown keys are an error naming them)."""
    return get_method(method).config_cls.from_dict({"method": method, **settings})


def quantize(
    loaded: LoadedModel,
    method: str,
    config: MethodConfig | dict[str, Any],
    calib: CalibSpec,
    progress: bool = True,
    workdir: str | Path | None = None,
    resume: bool = False,
) -> QuantizeResult:
    """Quantize ``loaded.model`` in place: block by block, or as a whole for whole-model
    methods (training). Both keep resumable state in ``workdir`` (none if ``None``): per
    finished block (:mod:`lowbit.engine.resume`), or training checkpoints; ``resume``
    continues from it (an existing state without ``resume`` is an error)."""
    if loaded.manifest is not None:
        raise LowbitError(f"{loaded.spec} is already quantized; quantize the original model")
    if isinstance(config, dict):
        config = build_config(method, config)
    registered = get_method(method)
    _check_widths(loaded, config)
    check_finite_weights(loaded.model)
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
            ids, store = _distributed_share(method, registered, ids, resume), None
        else:
            store = _block_checkpoints(loaded, config, calib, text, ids, workdir, resume)
        reports = quantize_sequential(
            loaded.model, loaded.table, ids, registered, config, calib.batch_size, progress, store
        )
        earlier = store.earlier_seconds if store is not None else 0.0
    seconds = earlier + time.perf_counter() - start
    return QuantizeResult(
        method, config, calib, text_sha256(text), reports, average_bits(loaded.model), seconds,
        extra,
    )


def _distributed_share(method: str, registered, ids: torch.Tensor, resume: bool) -> torch.Tensor:
    """This process's calibration windows under torchrun (no checkpoints there)."""
    if not registered.distributed:
        able = sorted(m.name for m in METHODS.values() if m.distributed)
        raise LowbitError(
            f"method '{method}' runs in one process; under torchrun use one of: {', '.join(able)}"
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
) -> BlockCheckpoints | None:
    """Per-block checkpoints in ``workdir``, fingerprinted by everything the result depends
    on: method settings, calibration (spec, text, tokens) and the model's weights."""
    if workdir is None:
        return None
    run = {
        "config": config.to_dict(),
        "calibration": {
            **dataclasses.asdict(calib),
            "text_sha256": text_sha256(text),
            "tokens_sha256": tensor_sha256({"ids": ids}),
        },
        "model": {
            "type": loaded.model.config.model_type,
            "weights_sha256": tensor_sha256(loaded.model.state_dict()),
        },
    }
    return BlockCheckpoints(CheckpointStore(workdir, resume), run)


def _model_context(loaded, calib, calib_ids, workdir, resume, progress) -> ModelContext:
    """The services a whole-model method gets: PTQ on the calibration data, token windows of
    any corpus, a checkpoint folder."""

    def ptq(name: str, settings: dict[str, Any]) -> list[LayerReport]:
        cfg = build_config(name, settings)
        return quantize_sequential(
            loaded.model, loaded.table, calib_ids(), get_method(name), cfg, calib.batch_size,
            progress,
        )

    def windows(corpus: str, n: int, seqlen: int, seed: int) -> tuple[torch.Tensor, str]:
        text = load_text(corpus)
        ids = calibration_batch(loaded.tokenizer, text, n, seqlen, seed, loaded.add_bos)
        return ids, text_sha256(text)

    store = None if workdir is None else CheckpointStore(workdir, resume)
    return ModelContext(loaded.model, loaded.table, loaded.add_bos, ptq, windows, store, progress)


def _check_widths(loaded: LoadedModel, config: MethodConfig) -> None:
    check = getattr(config, "check_width", None)
    if check is None:
        return
    blocks = get_blocks(loaded.model, loaded.table)
    linears = {
        f"{loaded.table.blocks}.{i}.{n}": block.get_submodule(n)
        for i, block in enumerate(blocks)
        for n in loaded.table.linear_names
    }
    widths = sorted({m.in_features for m in linears.values()})
    for name, module in linears.items():
        check(name, module.in_features, widths)


def average_bits(model: nn.Module) -> float:
    """Stored bits per weight over all quantized linears (embeddings and head excluded)."""
    layers = lowbit_format.quantized_layers(model).values()
    numel = sum(q.in_features * q.out_features for q in layers)
    if not numel:
        return 16.0
    return sum(q.bits_per_weight() * q.in_features * q.out_features for q in layers) / numel


def save_quantized(loaded: LoadedModel, result: QuantizeResult, out_dir: str | Path) -> Path:
    """Write the quantized model and its manifest (see :mod:`lowbit.export.lowbit_format`)."""
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
    return lowbit_format.save_quantized(loaded.model, loaded.tokenizer, out_dir, manifest)


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
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
