"""Pre-flight: the memory and disk a block-wise quantization run will need, before it starts.

Computed from the safetensors headers and the model's config alone (nothing is loaded), so a
run that cannot fit says so in its first second instead of after an hour or an OOM kill. The
parts of the peak resident memory, beyond what the process holds already:

- weights: the whole model (a normal run: every weight is resident by the end, plus the
  dequantized copy of the group of blocks being calibrated), or for a streamed run the weights
  outside the blocks (embeddings, final norm, LM head) + ``2 g`` blocks: the group of ``g``
  blocks being quantized (``g = 1`` unless the method corrects groups of blocks) and the
  dequantized copy the engine caches to run them;
- calibration activations: ``nsamples x seqlen x hidden`` values, twice (a block's inputs and
  its outputs), three times for methods with a group step (the group's full-precision targets);
- the forward pass of one calibration batch: ``batch x seqlen x (3 intermediate + heads x seqlen
  + 4 hidden)`` values (MLP, attention scores, residual);
- the solver: the Hessians of the largest set of linears sharing an input, ``max(3 hidden^2,
  intermediate^2)`` fp32 values, twice (the inverse);
- an allowance of 384 MiB for the tokenizer, the tokenized calibration corpus and what loads
  lazily (measured here: 200-250 MiB for SmolLM2's tokenizer and Emma, 380 MiB for Gemma-3's
  262k-token vocabulary).

Disk: the output (weights outside the blocks + quantized blocks at the method's bits) and the
run's checkpoints (the quantized blocks again, two inputs files of calibration activations).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.engine.streaming import WeightIndex
from lowbit.errors import LowbitError
from lowbit.memory import available_bytes, rss_bytes
from lowbit.models.arch import BlockTable

ALLOWANCE = 384 * 2**20  # tokenizer, tokenized calibration text, lazily loaded code


def activation_copies(group_blocks: int) -> int:
    """Copies of the calibration activations alive at once: a block's inputs and outputs,
    and the group's full-precision targets for methods with a group step."""
    return 2 if group_blocks == 1 else 3


@dataclass(frozen=True)
class RunShape:
    """What the estimate needs to know of the run besides the model's files.

    Attributes:
        nsamples, seqlen, batch_size: calibration windows, tokens per window, windows per pass.
        group_blocks: blocks quantized together (the method's group step), 1 for most methods.
        bits: estimated stored bits per quantized weight (codes and statistics).
        stream: blocks read from disk one group at a time.
    """

    nsamples: int
    seqlen: int
    batch_size: int
    group_blocks: int
    bits: float
    stream: bool


@dataclass(frozen=True)
class Estimate:
    """Pre-flight estimate, bytes. ``memory``: what the run adds to the ``process``'s resident
    memory at its peak, by part; ``disk``: what it writes, by part, at ``where``."""

    stream: bool
    process: int
    memory: dict[str, int]
    available: int | None
    disk: dict[str, int]
    disk_free: int | None
    where: Path
    streamed_need: int | None = None  # a normal run: what --stream would need instead
    activations: int = 0

    @property
    def need(self) -> int:
        return sum(self.memory.values())

    @property
    def peak(self) -> int:
        return self.process + self.need

    def to_dict(self) -> dict:
        """For JSON reports: every figure in bytes."""
        return {
            "stream": self.stream,
            "peak_bytes": self.peak,
            "process_bytes": self.process,
            "memory_bytes": dict(self.memory),
            "available_bytes": self.available,
            "disk_bytes": dict(self.disk),
            "disk_free_bytes": self.disk_free,
            "where": str(self.where),
        }

    def describe(self) -> str:
        """Two lines for people: peak memory by part against what is available, disk likewise."""
        mode = "streamed" if self.stream else "whole model in memory"
        avail = "unknown" if self.available is None else _size(self.available)
        free = "unknown" if self.disk_free is None else _size(self.disk_free)
        return (
            f"pre-flight ({mode}): peak memory ~{_size(self.peak)} = {_size(self.process)} "
            f"already resident + {_listing(self.memory)}; {avail} available\n"
            f"pre-flight: disk ~{_size(sum(self.disk.values()))} ({_listing(self.disk)}); "
            f"{free} free at {self.where}"
        )

    def check(self) -> None:
        """LowbitError naming the fixes when the run needs more memory or disk than there is."""
        if self.available is not None and self.need > self.available:
            raise LowbitError(self._memory_message())
        if self.disk_free is not None and sum(self.disk.values()) > self.disk_free:
            raise LowbitError(
                f"not enough disk: the output and its checkpoints need about "
                f"{_size(sum(self.disk.values()))} at {self.where} but {_size(self.disk_free)} "
                "is free; free some space or choose another --out"
            )

    def _memory_message(self) -> str:
        fixes = []
        if not self.stream and self.streamed_need is not None:
            fits = self.available is not None and self.streamed_need <= self.available
            fixes.append(f"add --stream (needs about {_size(self.streamed_need)}"
                         f"{'' if fits else ', still too much'})")
        fixes.append(
            f"lower --nsamples or --seqlen (calibration activations take "
            f"{_size(self.activations)})"
        )
        fixes.append("free memory, or pass --no-preflight to run anyway")
        return (
            f"not enough memory: this run needs about {_size(self.need)} more than the "
            f"{_size(self.process)} resident now ({_listing(self.memory)}) but "
            f"{_size(self.available or 0)} is available; {'; '.join(fixes)}"
        )


def estimate(
    index: WeightIndex,
    config,
    table: BlockTable,
    run: RunShape,
    out: str | Path,
    dtype: torch.dtype = torch.float32,
) -> Estimate:
    """The pre-flight estimate of quantizing the model of ``index`` (its HF ``config`` and
    block ``table``) with ``run``'s settings, writing to ``out``."""
    sizes = _ModelSizes.of(index, table, dtype, run.bits)
    width = dtype.itemsize
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", 4 * hidden)
    heads = config.num_attention_heads
    act = run.nsamples * run.seqlen * hidden * width
    copies = activation_copies(run.group_blocks)
    common = {
        f"calibration activations ({copies} x {run.nsamples} x {run.seqlen} x {hidden})":
            copies * act,
        f"forward of one batch of {run.batch_size}":
            run.batch_size * run.seqlen * width * (3 * inter + heads * run.seqlen + 4 * hidden),
        "solver": 2 * 4 * max(3 * hidden**2, inter**2),
        "tokenizer and calibration text (allowance)": ALLOWANCE,
    }
    g = min(run.group_blocks, sizes.n_blocks)  # a group larger than the model is the model
    streamed = {
        "weights outside the blocks": sizes.rest,
        f"{2 * g} blocks (full precision + dequantized copy)": 2 * g * sizes.max_block,
        **common,
    }
    whole = {
        f"whole model ({sizes.n_blocks} blocks)": sizes.rest + sizes.blocks,
        f"dequantized copy of {g} block{'s' if g > 1 else ''}": g * sizes.max_block,
        **common,
    }
    where = _existing_parent(Path(out))
    return Estimate(
        stream=run.stream,
        process=rss_bytes(),
        memory=streamed if run.stream else whole,
        available=available_bytes(),
        disk={
            "output": sizes.rest + sizes.quantized,
            "checkpoints": sizes.quantized + 2 * act,
        },
        disk_free=shutil.disk_usage(where).free,
        where=where,
        streamed_need=None if run.stream else sum(streamed.values()),
        activations=copies * act,
    )


@dataclass(frozen=True)
class _ModelSizes:
    """Bytes of a model's weights in memory (as ``dtype``) and quantized on disk."""

    rest: int  # outside the blocks (kept as loaded, in memory and in the output)
    blocks: int  # all blocks, in memory
    max_block: int
    n_blocks: int
    quantized: int  # all blocks, quantized

    @classmethod
    def of(cls, index: WeightIndex, table: BlockTable, dtype: torch.dtype, bits: float):
        per_block: dict[int, list[str]] = {}
        rest = []
        for name in index.specs:
            block = table.block_of(name)
            if block is None:
                rest.append(name)
            else:
                per_block.setdefault(block, []).append(name)
        if not per_block:
            raise LowbitError(
                f"{index.folder} has no weights under {table.blocks}; it does not match its "
                "config.json"
            )
        sizes = [index.nbytes(names, dtype) for names in per_block.values()]
        linears = {f"{table.blocks}.{i}.{n}.weight" for i in per_block for n in table.linear_names}
        linear_numel = sum(s.numel for n, s in index.specs.items() if n in linears)
        linear_bytes = index.nbytes([n for n in index.specs if n in linears], dtype)
        rest_bytes = index.nbytes(rest, dtype)
        return cls(
            rest=rest_bytes,
            blocks=sum(sizes),
            max_block=max(sizes),
            n_blocks=len(sizes),
            quantized=sum(sizes) - linear_bytes + int(linear_numel * bits / 8),
        )


def _existing_parent(path: Path) -> Path:
    """``path``'s nearest existing ancestor (the output folder may not exist yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path if path.is_dir() else path.parent


def _listing(parts: dict[str, int]) -> str:
    """``name size, name size, ...`` of a parts dict."""
    return ", ".join(f"{name} {_size(n)}" for name, n in parts.items())


def _size(n: int) -> str:
    """Bytes for people: MiB below 10 GiB, else GiB."""
    if n < 10 * 2**30:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**30:.1f} GiB"
