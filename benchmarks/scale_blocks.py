"""Per-block wall time and peak memory of GPTQ, SpQR and QLLM on one decoder block of Llama-3-8B
or Llama-3-70B shapes (random weights), and the whole model's time extrapolated from it.

Usage: PYTHONPATH=$PWD python benchmarks/scale_blocks.py [--model 8b 70b] [--methods gptq spqr qllm]
           [--nsamples 128] [--seqlen 2048] [--device auto|cpu|cuda] [--dtype bfloat16]
           [--settings '{"gptq": {"group_size": 128}}'] [--json results/scale/scale_blocks.json]

The block is a transformers ``LlamaForCausalLM`` with one layer (random init, std 0.02 as HF, in
``--dtype``, default bf16: the checkpoints' dtype), and its calibration inputs are random hidden
states ``[N, L, hidden]``. Each method runs through the engine's own per-group step
(:func:`lowbit.engine.sequential._quantize_group`, what ``lowbit quantize`` runs per block), with
the block's context timing its stages:

- ``hessians``: calibration forwards + ``X^T X`` (``BlockContext.collect_hessians``), tokens;
- ``stats``: QLLM's input-statistics forwards over every window (``input_stats``), tokens;
- ``solve``: the per-linear solves (``BlockContext.solve_layers``), fixed;
- ``other``: the rest of the method's ``apply_block`` (packing, error reports; QLLM's reassembly
  search, which runs on its ``search_windows`` windows only), fixed;
- ``outputs``: block-output forwards (``BlockContext.run``: the next block's inputs, QLLM's
  full-precision targets), tokens;
- ``correction``: QLLM's error correction (epochs over every window), tokens.

Fewer tokens than the target (``--target`` N x L, default the issue's 128 x 2048) may be measured
on a slow machine: stages marked *tokens* are scaled linearly by target tokens / measured tokens,
*fixed* stages are kept as measured. Keep ``--seqlen`` at the target's length so that the
scaling is exact (attention is quadratic in L; only N changes) and ``--nsamples`` at least
QLLM's ``search_windows`` (4). Memory: the measured peak RSS (and CUDA peak), the calibration
activations' size at the measured and the target count, and an estimate of the peak at the
target: measured peak + (target - measured activations) x the copies the engine keeps alive.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lowbit.algorithms import qllm as qllm_module
from lowbit.core.method import Method, method_for
from lowbit.engine.capture import capture_block_inputs
from lowbit.engine.context import BlockContext
from lowbit.engine.placement import module_bytes, resolve_device, to_device
from lowbit.engine.preflight import activation_copies
from lowbit.engine.sequential import _place_activations, _quantize_group
from lowbit.loading import dtype_named
from lowbit.memory import peak_rss_mb, reset_peak_rss, trim_heap
from lowbit.models.arch import get_blocks
from lowbit.models.discovery import table_of
from lowbit.pipeline.configs import build_config

GIB = 2**30
TARGET = (128, 2048)  # the calibration: 128 windows of 2048 tokens
TOKENS, FIXED = "tokens", "fixed"
STAGES = {  # name -> (how it scales with calibration tokens, what it is)
    "hessians": (TOKENS, "calibration forwards + X^T X"),
    "stats": (TOKENS, "QLLM input-statistics forwards"),
    "solve": (FIXED, "per-linear solves"),
    "other": (FIXED, "rest of apply_block (packing, reports, QLLM search)"),
    "outputs": (TOKENS, "block-output forwards"),
    "correction": (TOKENS, "QLLM error correction"),
}
ANCHORS = {  # published whole-model times on one A100 (the anchors)
    ("Llama-3-70B", "spqr"): "SpQR paper: LLaMA-65B (80 blocks) in 4.5 h on one A100",
    ("Llama-3-8B", "gptq"): "llm-compressor: Llama-3-8B GPTQ about 30 min on an A100",
}


@dataclass(frozen=True)
class BlockShape:
    """A decoder block's sizes and how many the model has."""

    name: str
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    blocks: int


def block_params(shape: BlockShape) -> int:
    """Parameters of one block: q/o ``[H, H]``, k/v ``[kv * H / heads, H]``, gate/up/down
    ``H x F``, two norms ``[H]``."""
    kv = shape.kv_heads * shape.hidden // shape.heads
    return 2 * shape.hidden**2 + 2 * kv * shape.hidden + 3 * shape.hidden * shape.ffn \
        + 2 * shape.hidden


SHAPES = {
    "8b": BlockShape("Llama-3-8B", 4096, 14336, 32, 8, 32),
    "70b": BlockShape("Llama-3-70B", 8192, 28672, 64, 8, 80),
}


class StageClock:
    """Seconds per stage, summed over calls; on CUDA each stage's edges synchronise."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start


@dataclass
class TimedBlockContext(BlockContext):
    """The engine's block context, timing its calibration forwards, solves and output runs."""

    clock: StageClock | None = None

    def collect_hessians(self, names: list[str]) -> dict[str, torch.Tensor]:
        with self.clock.stage("hessians"):
            return super().collect_hessians(names)

    def solve_layers(self, names, solve):
        with self.clock.stage("solve"):
            return super().solve_layers(names, solve)

    def run(self, hidden: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        with self.clock.stage("outputs"):
            return super().run(hidden)


def timed_method(method: Method, clock: StageClock) -> Method:
    """``method`` with its ``apply_block`` (stage ``apply``) and group step (``correction``)
    timed."""

    def apply(config, ctx):
        with clock.stage("apply"):
            return method.apply_block(config, ctx)

    def finish(config, group, reports):
        with clock.stage("correction"):
            return method.finish_group(config, group, reports)

    return dataclasses.replace(
        method, apply_block=apply, finish_group=finish if method.finish_group else None
    )


@contextmanager
def timed_input_stats(clock: StageClock) -> Iterator[None]:
    """QLLM's per-group input statistics (a forward over every window) timed as ``stats``."""
    original = qllm_module.input_stats

    def timed(*args, **kwargs):
        with clock.stage("stats"):
            return original(*args, **kwargs)

    qllm_module.input_stats = timed
    try:
        yield
    finally:
        qllm_module.input_stats = original


def llama_block(shape: BlockShape, dtype: torch.dtype, seqlen: int, seed: int = 0):
    """A one-layer ``LlamaForCausalLM`` of ``shape`` (random init as HF's, std 0.02) in
    ``dtype``, with a 256-word vocabulary (the embedding is only used to capture the block's
    call arguments), and its block table."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.ffn, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, num_hidden_layers=1, vocab_size=256,
        max_position_embeddings=max(seqlen, 8192), rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        initializer_range=0.02, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype: no fp32 copy of a 70B block
    try:
        model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model, table_of(model)


def random_hidden(n: int, seqlen: int, hidden: int, batch: int, dtype: torch.dtype,
                  seed: int = 0) -> list[torch.Tensor]:
    """Calibration inputs of the block: ``n`` windows ``[b, seqlen, hidden]`` of standard
    normal values in ``dtype``, ``batch`` windows per tensor (the engine's batches)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(min(batch, n - s), seqlen, hidden, generator=gen).to(dtype)
            for s in range(0, n, batch)]


def measure_block(shape: BlockShape, method_name: str, nsamples: int, seqlen: int,
                  device: torch.device, dtype: torch.dtype, batch: int = 8,
                  settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quantize one random block of ``shape`` with ``method_name`` on ``nsamples`` x ``seqlen``
    random tokens through the engine's per-group step; seconds per stage (:data:`STAGES`),
    total seconds, peak memory (MiB) and activation sizes (bytes)."""
    config = build_config(method_name, settings or {})
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, table = llama_block(shape, dtype, seqlen)
    blocks = get_blocks(model, table)
    ids = torch.zeros(min(batch, nsamples), seqlen, dtype=torch.long)
    inputs = capture_block_inputs(model, blocks, ids, ids.shape[0])  # call args per batch size
    inputs.hidden = []
    inputs.calls = [to_device(calls, device) for calls in inputs.calls]  # as the engine does
    hidden = random_hidden(nsamples, seqlen, shape.hidden, batch, dtype)
    act_bytes = sum(x.numel() * x.element_size() for x in hidden)
    weight_bytes = module_bytes(blocks[0])  # before the method replaces its linears
    method = method_for(config)
    size = method.group_blocks(config)
    hidden = _place_activations(hidden, device, size, blocks[0])
    clock = StageClock(device)
    ctx = TimedBlockContext(blocks[0].to(device), 0, f"{table.blocks}.0", table, hidden, inputs,
                            device=device, clock=clock)
    del hidden
    bar = tqdm(total=1, disable=True)
    with clock.stage("total"), timed_input_stats(clock):
        reports, _out = _quantize_group([ctx], timed_method(method, clock), config, bar)
    del _out
    seconds = dict(clock.seconds)
    apply = seconds.pop("apply", 0.0)
    inside = seconds.get("hessians", 0.0) + seconds.get("solve", 0.0) + seconds.get("stats", 0.0)
    seconds["other"] = max(apply - inside, 0.0)
    total = seconds.pop("total")
    out = {
        "model": shape.name, "shape": dataclasses.asdict(shape), "method": method_name,
        "config": config.to_dict(),
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "nsamples": nsamples, "seqlen": seqlen, "batch": batch,
        "stages_s": {name: seconds.get(name, 0.0) for name in STAGES},
        "total_s": total, "layers": sum(len(block) for block in reports),
        "peak_rss_mib": peak_rss_mb(),
        "block_weight_bytes": weight_bytes,
        "activation_bytes": act_bytes, "activation_copies": activation_copies(size),
        "activation_home": str(ctx.hidden[0].device) if ctx.hidden else str(device),
    }
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    del ctx, model, blocks, inputs
    trim_heap()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def extrapolate(run: dict[str, Any], shape: BlockShape, target: tuple[int, int]) -> dict:
    """``run`` scaled to ``target`` (N, L) calibration tokens: token stages x target tokens /
    measured tokens, fixed stages as measured; per-block seconds, whole-model hours (blocks x
    per block), activation bytes at the target and the estimated peak there."""
    factor = target[0] * target[1] / (run["nsamples"] * run["seqlen"])
    stages = {
        name: sec * (factor if STAGES[name][0] == TOKENS else 1.0)
        for name, sec in run["stages_s"].items()
    }
    block_s = sum(stages.values())
    act = run["activation_bytes"] * factor
    grown = (act - run["activation_bytes"]) * run["activation_copies"]
    on_cuda = run["activation_home"].startswith("cuda")
    peak_key = "peak_cuda_mib" if on_cuda else "peak_rss_mib"
    return {
        "target": list(target), "token_factor": factor, "stages_s": stages,
        "block_s": block_s, "model_hours": shape.blocks * block_s / 3600,
        "activation_bytes": act,
        "peak_estimate_mib": run[peak_key] + grown / 2**20, "peak_estimate_of": peak_key,
    }


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    return {"device_name": name, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}


def merge_json(path: Path, header: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """Write ``runs`` into ``path``, replacing earlier runs of the same model, method, device,
    dtype and token count (runs of other settings stay: one file holds CPU and GPU rows)."""

    def key(r):
        return (r["model"], r["method"], r["device"].split(":")[0], r["dtype"],
                r["nsamples"], r["seqlen"])

    old = json.loads(path.read_text()) if path.exists() else {"runs": []}
    new_keys = {key(r) for r in runs}
    kept = [r for r in old["runs"] if key(r) not in new_keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**header, "runs": kept + runs}, indent=2) + "\n")


def method_label(run: dict[str, Any]) -> str:
    """The run's method with the settings it changed from the method's defaults."""
    default = build_config(run["method"], {}).to_dict()
    changed = [f"{k} {v}" for k, v in run["config"].items() if default.get(k) != v]
    return run["method"] + (f" ({', '.join(changed)})" if changed else "")


def print_tables(runs: list[dict[str, Any]]) -> None:
    print("\n| model | method | device | tokens measured | hessians s | stats s | solve s | "
          "other s | outputs s | correction s | block s measured | block s at N x L | "
          "whole model h at N x L | load 1 min before/after | anchor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        x = r["extrapolated"]
        st = r["stages_s"]
        print(f"| {r['model']} | {method_label(r)} | {r['device']} {r['dtype']} | "
              f"{r['nsamples']} x {r['seqlen']} | "
              + " | ".join(f"{st[s]:.1f}" for s in STAGES)
              + f" | {r['total_s']:.1f} | {x['block_s']:.0f} ({x['target'][0]} x "
              f"{x['target'][1]}) | {x['model_hours']:.2f} | "
              f"{r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f} | "
              f"{ANCHORS.get((r['model'], r['method']), '')} |")
    print("\n| model | method | peak RSS GiB | peak CUDA GiB | block weights GiB | "
          "activations GiB measured | activations GiB at N x L (x copies) | "
          "est. peak GiB at N x L |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        x = r["extrapolated"]
        cuda = f"{r['peak_cuda_mib'] / 1024:.2f}" if "peak_cuda_mib" in r else "-"
        weights = block_params(BlockShape(**r["shape"])) * torch.empty(
            (), dtype=dtype_named(r["dtype"])).element_size()
        where = "CUDA" if x["peak_estimate_of"] == "peak_cuda_mib" else "RSS"
        print(f"| {r['model']} | {method_label(r)} | {r['peak_rss_mib'] / 1024:.2f} | {cuda} | "
              f"{weights / GIB:.2f} | {r['activation_bytes'] / GIB:.3f} | "
              f"{x['activation_bytes'] / GIB:.2f} (x{r['activation_copies']}) | "
              f"{x['peak_estimate_mib'] / 1024:.1f} ({where}) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--methods", nargs="+", default=["gptq", "spqr", "qllm"])
    p.add_argument("--nsamples", type=int, default=TARGET[0], help="calibration windows")
    p.add_argument("--seqlen", type=int, default=TARGET[1], help="tokens per window")
    p.add_argument("--batch", type=int, default=8, help="windows per forward (the engine's "
                                                         "--batch-size)")
    p.add_argument("--target", type=int, nargs=2, default=list(TARGET), metavar=("N", "L"),
                   help="calibration size the per-block time is extrapolated to")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="bfloat16", help="forward dtype (bfloat16, float16, "
                                                       "float32)")
    p.add_argument("--settings", default="{}",
                   help='method settings as JSON keyed by method, e.g. {"gptq": {"bits": 3}}')
    p.add_argument("--json", default="results/scale/scale_blocks.json")
    p.add_argument("--show", action="store_true", help="print the tables of every run in --json "
                                                       "and exit")
    args = p.parse_args()
    if args.show:
        print_tables(json.loads(Path(args.json).read_text())["runs"])
        return
    device = resolve_device(args.device)
    dtype = dtype_named(args.dtype)
    settings = json.loads(args.settings)
    header = {
        "command": "python benchmarks/scale_blocks.py " + " ".join(
            f"--{k.replace('_', '-')} "
            + (" ".join(map(str, v)) if isinstance(v, list) else shlex.quote(str(v)))
            for k, v in vars(args).items() if k != "show"),
        "machine": machine(device), "loadavg_before": os.getloadavg(),
        "stage_kinds": {name: kind for name, (kind, _what) in STAGES.items()},
        "stage_meaning": {name: what for name, (_kind, what) in STAGES.items()},
    }
    runs = []
    for key in args.model:
        shape = SHAPES[key]
        for method in args.methods:
            print(f"{shape.name} {method}: {args.nsamples} x {args.seqlen} tokens on {device} "
                  f"({dtype}) ...", flush=True)
            before = os.getloadavg()
            run = measure_block(shape, method, args.nsamples, args.seqlen, device, dtype,
                                args.batch, settings.get(method))
            run["extrapolated"] = extrapolate(run, shape, tuple(args.target))
            run.update(loadavg_before=before, loadavg_after=os.getloadavg(),
                       machine=header["machine"], command=header["command"])
            print(json.dumps({k: run[k] for k in ("stages_s", "total_s", "peak_rss_mib")}),
                  flush=True)
            runs.append(run)
            header["loadavg_after"] = run["loadavg_after"]
            header["uptime"] = os.popen("uptime").read().strip()
            if args.json:  # after every run: a run cut short keeps the finished ones
                merge_json(Path(args.json), header, [run])
    print_tables(runs)
    print(f"\nload average before {header['loadavg_before']}, after "
          f"{header.get('loadavg_after')}; {header['machine']}")


if __name__ == "__main__":
    main()
