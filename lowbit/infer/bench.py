"""Decode benchmark: batch-1 greedy decode and prefill speed of a quantized model against its
base model in fp32 and bf16, with the bytes each decode step reads and the fraction of the
machine's measured memory bandwidth that reaches.

Every variant runs the same prompt (the first ``prompt_len`` tokens of a bundled corpus) through
a :class:`~lowbit.infer.decode.Decoder` (static KV cache; compiled decode step unless turned
off). Prefill speed is the best of ``prefill_repeats`` prompt forwards; decode speed is
``tokens - 1`` decode steps after the prefill (EOS ignored) divided by their total time.
"""

from __future__ import annotations

import gc
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError, user_input
from lowbit.infer.bandwidth import Bandwidth, measure_bandwidth
from lowbit.infer.decode import Decoder
from lowbit.infer.footprint import kv_cache_bytes, weight_bytes_per_token
from lowbit.infer.prepare import path_counts, prepare_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class DecodeBenchConfig:
    """Attributes:
    tokens: tokens generated per measured run (``tokens - 1`` timed decode steps).
    prompt_len: prompt tokens (prefill length and decode context).
    compile: compile the decode step (prefill runs eagerly).
    prefill_repeats: prefill forwards timed (the best counts).
    corpus: bundled corpus (or text file) the prompt is cut from.
    quant_dtype: activation dtype the quantized model runs in (``bf16``: the int4/int8 paths).
    bandwidth_mib: buffer size of the bandwidth measurement.
    device: where every variant runs (``cpu``, ``cuda``, ``cuda:N``), moved whole; the bandwidth
        fractions are those of the CPU's memory.
    """

    tokens: int = 64
    prompt_len: int = 128
    compile: bool = True
    prefill_repeats: int = 3
    corpus: str = "austen-pp"
    quant_dtype: str = "bf16"
    bandwidth_mib: int = 256
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.tokens < 2 or self.prompt_len < 1 or self.prefill_repeats < 1:
            raise ValueError("need tokens >= 2, prompt_len >= 1 and prefill_repeats >= 1")
        if self.quant_dtype not in DTYPES:
            raise ValueError(f"quant_dtype must be one of {', '.join(DTYPES)}")


@dataclass
class VariantSpeed:
    """Measured speed of one model in one dtype (seconds and bytes are per run/step)."""

    label: str
    spec: str
    dtype: str
    kernel_paths: dict[str, int]
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_seconds: float
    decode_ms_per_token: float
    weight_bytes_per_token: int
    kv_cache_bytes: int
    compiled: bool
    compile_seconds: float
    compile_note: str | None
    load_seconds: float
    sample: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_per_token(self) -> int:
        return self.weight_bytes_per_token + self.kv_cache_bytes

    def achieved_gbs(self) -> float:
        return self.bytes_per_token * self.decode_tokens_per_s / 1e9

    def to_dict(self, bandwidth: Bandwidth) -> dict[str, Any]:
        out = asdict(self)
        out["bytes_per_token"] = self.bytes_per_token
        out["achieved_gbs"] = self.achieved_gbs()
        out["fraction_of_copy_bandwidth"] = self.achieved_gbs() / bandwidth.copy_gbs
        out["fraction_of_read_bandwidth"] = self.achieved_gbs() / bandwidth.read_gbs
        return out


def prompt_ids(tokenizer, corpus: str, length: int, add_bos: bool) -> torch.Tensor:
    """int64 ``[1, length]``: the first tokens of ``corpus`` (BOS first when the model uses it)."""
    from lowbit.data.corpora import load_text

    text = load_text(corpus)
    ids = tokenizer(text[: 16 * length + 4096], add_special_tokens=False)["input_ids"]
    if add_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if len(ids) < length:
        raise ValueError(f"corpus {corpus} gives only {len(ids)} tokens; use a shorter prompt")
    return torch.tensor([ids[:length]])


def bench_variant(label: str, spec: str, dtype: str, cfg: DecodeBenchConfig) -> VariantSpeed:
    """Load ``spec`` in ``dtype``, prepare its kernels, and time prefill and decode."""
    from lowbit.loading import load_model

    start = time.perf_counter()
    loaded = load_model(spec, DTYPES[dtype])
    model = loaded.model.to(cfg.device)
    paths = path_counts(prepare_model(model, DTYPES[dtype]))
    load_seconds = time.perf_counter() - start
    with user_input("--prompt-len"):  # the message says the fix
        ids = prompt_ids(loaded.tokenizer, cfg.corpus, cfg.prompt_len, loaded.add_bos)
    ids = ids.to(cfg.device)
    decoder = Decoder(model, cfg.prompt_len + cfg.tokens, cfg.compile)
    decoder.warm_up(ids)
    prefill = best_prefill_seconds(decoder, ids, cfg.prefill_repeats)
    run = decoder.generate(ids, cfg.tokens)
    speed = VariantSpeed(
        label=label,
        spec=spec,
        dtype=dtype,
        kernel_paths=paths,
        prefill_tokens_per_s=cfg.prompt_len / prefill,
        decode_tokens_per_s=run.decode_tokens_per_second,
        prefill_seconds=prefill,
        decode_ms_per_token=1e3 / run.decode_tokens_per_second,
        weight_bytes_per_token=weight_bytes_per_token(model),
        kv_cache_bytes=kv_cache_bytes(decoder.cache),
        compiled=decoder.compiled,
        compile_seconds=decoder.compile_seconds,
        compile_note=decoder.compile_note,
        load_seconds=load_seconds,
        sample=loaded.tokenizer.decode(run.new_tokens[:24]),
    )
    del decoder, model, loaded
    gc.collect()
    return speed


@torch.inference_mode()
def best_prefill_seconds(decoder: Decoder, ids: torch.Tensor, repeats: int) -> float:
    """Fastest of ``repeats`` prefills of ``ids`` ``[1, P]`` into an emptied cache."""
    best = float("inf")
    for _ in range(repeats):
        decoder.cache.reset()
        start = time.perf_counter()
        decoder.prefill(ids)
        best = min(best, time.perf_counter() - start)
    return best


def variants_for(spec: str, cfg: DecodeBenchConfig) -> tuple[list[tuple[str, str, str]], dict]:
    """``[(label, spec, dtype)]`` to run, and facts about the model: a lowbit DIR runs as
    ``quantized`` plus its base model (recorded in lowbit.json) in fp32 and bf16; any other
    model runs in fp32 and bf16."""
    from lowbit.export.lowbit_format import is_lowbit_dir, read_manifest
    from lowbit.models.bundled import BUNDLED

    _check_loadable(spec, "")
    if spec in BUNDLED or not is_lowbit_dir(spec):
        return [("base", spec, "fp32"), ("base", spec, "bf16")], {"base_model": spec}
    manifest = read_manifest(spec)
    base = manifest["source_model"]
    _check_loadable(base, f" (the base model recorded in {spec}/lowbit.json)")
    facts = {"base_model": base, "method": manifest.get("method"),
             "avg_bits": manifest.get("avg_bits")}
    runs = [("quantized", spec, cfg.quant_dtype), ("base", base, "fp32"), ("base", base, "bf16")]
    return runs, facts


def _check_loadable(spec: str, what: str) -> None:
    from lowbit.models.bundled import BUNDLED

    if spec not in BUNDLED and not (Path(spec) / "config.json").is_file():
        raise LowbitError(
            f"model '{spec}'{what} is neither a bundled model ({', '.join(BUNDLED)}) nor a "
            "folder with config.json; give a lowbit DIR, a bundled name or a HF folder "
            "(run from the folder the DIR was quantized in if its base is a relative path)"
        )


def ratios(speeds: list[VariantSpeed]) -> dict[str, float]:
    """Speed of the headline variant (the quantized model, else base bf16) over base fp32 and
    base bf16, for decode and prefill."""
    by = {(s.label, s.dtype): s for s in speeds}
    head = next((s for s in speeds if s.label == "quantized"), by.get(("base", "bf16")))
    out = {}
    for kind in ("decode", "prefill"):
        for ref_dtype in ("fp32", "bf16"):
            ref = by.get(("base", ref_dtype))
            if ref is not None and ref is not head:
                key = f"{kind}_tokens_per_s"
                out[f"{kind}_vs_{ref_dtype}"] = getattr(head, key) / getattr(ref, key)
    return out


def run_decode_bench(spec: str, cfg: DecodeBenchConfig, progress=None) -> dict[str, Any]:
    """Measure bandwidth, then every variant of ``spec`` in turn (one model in memory at a
    time). Returns the JSON-able report (see docs/SPEED.md)."""
    start = time.perf_counter()
    runs, facts = variants_for(spec, cfg)
    bandwidth = measure_bandwidth(cfg.bandwidth_mib << 20)
    speeds = []
    for label, model, dtype in runs:
        if progress is not None:
            progress(f"{label} {model} ({dtype}) ...")
        speeds.append(bench_variant(label, model, dtype, cfg))
    return {
        "model": spec,
        **facts,
        "config": asdict(cfg),
        "machine": {**asdict(bandwidth), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine()},
        "ratios": ratios(speeds),
        "variants": [s.to_dict(bandwidth) for s in speeds],
        "seconds": time.perf_counter() - start,
    }
