"""Streaming quantization: the full-precision model is never in memory at once.

:func:`load_streamed` builds the model on the meta device (accelerate's ``init_empty_weights``;
buffers such as rotary frequencies are computed as usual) and reads only its non-block weights
(embeddings, final norm, LM head; tied weights stay tied) from the safetensors files. The
sequential engine then asks :class:`BlockStream` for each decoder block's weights just before
it quantizes the block (:meth:`BlockStream.load`) and hands the block back once its quantized
state is in the run's checkpoint folder (:meth:`BlockStream.release`), which returns it to the
meta device.

safetensors maps its files: a tensor it reads is a view of a private (copy-on-write) mapping of
the file, and pages become resident only when touched. Each block is read through a mapping of
its own, so releasing the block unmaps its pages. Resident memory stays about the non-block
weights + two blocks (the full-precision pages and the dequantized copy the engine caches) +
one block's calibration activations, whatever the number of blocks. The quantized blocks are
read back one at a time from the checkpoint files when the output is written
(:meth:`BlockStream.offloaded`, :func:`lowbit.export.lowbit_format.save_quantized`).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.engine.context import drop_dense_caches
from lowbit.engine.guards import nonfinite_error
from lowbit.engine.resume import BlockCheckpoints, hash_tensor
from lowbit.errors import LowbitError
from lowbit.models.arch import BlockTable, get_blocks
from lowbit.models.convert import linear_layout
from lowbit.models.discovery import find_structure, table_of
from lowbit.nn.quant_linear import QuantLinear

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# bytes per element of the safetensors dtype names
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_FLOAT = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0"}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a safetensors file, from the file's header only."""

    file: Path
    dtype: str  # safetensors name: "F32", "BF16", "I32", ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self, as_dtype: torch.dtype | None = None) -> int:
        """Bytes in memory: in the file's dtype, or ``as_dtype`` for floating tensors (loading
        casts them to the model's dtype)."""
        if as_dtype is not None and self.dtype in _FLOAT:
            return self.numel * as_dtype.itemsize
        return self.numel * _ITEMSIZE.get(self.dtype, 4)


class WeightIndex:
    """Where each tensor of a Hugging Face folder is: ``model.safetensors`` or the shards named by
    ``model.safetensors.index.json``. Built from the files' headers; reads nothing else."""

    def __init__(self, folder: Path, specs: dict[str, TensorSpec]) -> None:
        self.folder = folder
        self.specs = specs

    @classmethod
    def from_folder(cls, folder: str | Path) -> WeightIndex:
        folder = Path(folder)
        if (folder / INDEX).is_file():
            files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        elif (folder / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise LowbitError(
                f"{folder} has no safetensors weights ({SINGLE} or {INDEX}); streaming reads "
                "them lazily: save the model with save_pretrained(safe_serialization=True), or "
                "run without --stream"
            )
        specs: dict[str, TensorSpec] = {}
        for name in files:
            for key, entry in _read_header(folder / name).items():
                specs[key] = TensorSpec(folder / name, entry["dtype"], tuple(entry["shape"]))
        return cls(folder, specs)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, as views of a fresh mapping of their files (pages are read when
        touched and unmapped when the last tensor of the mapping is freed)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.specs[name].file, []).append(name)
        out = {}
        for file, keys in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in keys})
        return out

    def nbytes(self, names: list[str], as_dtype: torch.dtype | None = None) -> int:
        return sum(self.specs[n].nbytes(as_dtype) for n in names)


def _read_header(file: Path) -> dict[str, dict]:
    """``{name: {"dtype", "shape", "data_offsets"}}`` of a safetensors file (8-byte little-endian
    header length, then the JSON header)."""
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise LowbitError(
            f"{file} cannot be read as safetensors ({exc}); copy the model again, or run "
            "without --stream"
        ) from exc
    header.pop("__metadata__", None)
    return header


def load_streamed(folder: str | Path, dtype: torch.dtype = torch.float32) -> BlockStream:
    """The model of HF folder ``folder`` with its decoder blocks on the meta device and every
    other weight read (memory-mapped) from its safetensors files; ``.model`` of the result."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    index = WeightIndex.from_folder(folder)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    model.eval()
    if any(linear_layout(model).values()):
        raise LowbitError(
            "--stream reads weights under the names the model's modules have; "
            f"{config.model_type} stores fused experts or Conv1D weights that lowbit converts "
            "first: run without --stream"
        )
    where = BlockTable(find_structure(model).blocks, (), ())  # enough to find the blocks
    stream = BlockStream(model, where, index)
    stream.load_rest()
    stream.table = _discovered(stream)
    return stream


def _discovered(stream: BlockStream) -> BlockTable:
    """The block table, found with block 0 read from disk for as long as it takes."""
    block = stream.blocks[0]
    stream.load(block, 0)
    try:
        return table_of(stream.model)
    finally:
        block.to("meta")


class BlockStream:
    """A model whose decoder blocks are read from disk one at a time (see the module doc).

    Attributes:
        model: the ``*ForCausalLM`` module; its blocks are on the meta device unless loaded.
        layers: ``{full name: (bits per weight, in_features, out_features)}`` of every quantized
            linear of the released blocks, in block order (for the average bits).
        checkpoints: where the quantized blocks are, once a run has quantized them.
    """

    def __init__(self, model: nn.Module, table: BlockTable, index: WeightIndex) -> None:
        self.model, self.table, self.index = model, table, index
        self.layers: dict[str, tuple[float, int, int]] = {}
        self.checkpoints: BlockCheckpoints | None = None
        state = model.state_dict(keep_vars=True)
        self._dtypes = {name: t.dtype for name, t in state.items()}
        self._sources, self._distinct = _sources(state, index)

    @property
    def blocks(self) -> nn.ModuleList:
        return get_blocks(self.model, self.table)

    def block_prefix(self, index: int) -> str:
        return f"{self.table.blocks}.{index}."

    def _in_blocks(self, name: str) -> bool:
        return self.table.block_of(name) is not None

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors under their model names, floating ones cast to the model's dtype."""
        tensors = self.index.read([self._sources[n] for n in names])
        out = {}
        for name in names:
            t = tensors[self._sources[name]]
            out[name] = t.to(self._dtypes[name]) if t.is_floating_point() else t
        return out

    def load_rest(self) -> None:
        """Read every weight outside the decoder blocks; tied weights are tied again."""
        names = [n for n in self._sources if not self._in_blocks(n)]
        self.model.load_state_dict(self._read(names), strict=False, assign=True)
        self.model.tie_weights()
        for name, t in self.model.state_dict().items():
            if t.is_meta and not self._in_blocks(name):
                raise LowbitError(
                    f"weight {name} is in no safetensors file of {self.index.folder} and is "
                    "tied to none that is; run without --stream"
                )

    def load(self, block: nn.Module, index: int) -> None:
        """Give meta-device block ``index`` its weights from the files (memory-mapped)."""
        prefix = self.block_prefix(index)
        names = [prefix + n for n in block.state_dict()]
        own = {n[len(prefix) :]: t for n, t in self._read(names).items()}
        block.load_state_dict(own, strict=True, assign=True)

    def release(self, block: nn.Module, index: int) -> None:
        """Record block ``index``'s quantized linears, then return it to the meta device (its
        quantized state is in the checkpoint folder)."""
        prefix = self.block_prefix(index)
        for name, m in block.named_modules():
            if isinstance(m, QuantLinear):
                self.layers[prefix + name] = (m.bits_per_weight(), m.in_features, m.out_features)
        drop_dense_caches(block)
        block.to("meta")

    @contextmanager
    def quantized_block(self, index: int) -> Iterator[nn.Module]:
        """Quantized block ``index`` read back from its checkpoint file, for as long as the
        context lasts."""
        if self.checkpoints is None:
            raise LowbitError("the streamed model is not quantized yet; quantize it first")
        block = self.blocks[index]
        self.checkpoints.restore_block(block, index)
        try:
            yield block
        finally:
            block.to("meta")

    def scan(self) -> str:
        """Read every weight once, one block at a time: a LowbitError naming the first tensor
        (in ``state_dict`` order) with NaN or Inf values, else the weights' sha256 (equal to
        :func:`lowbit.engine.resume.tensor_sha256` of the loaded model's state dict)."""
        digest = hashlib.sha256()
        bad: dict[str, torch.Tensor] = {}  # by name in the files
        state = self.model.state_dict()
        for group in _owner_runs(self._distinct, self.table):
            tensors = self._read(group) if self._in_blocks(group[0]) else state
            for name in group:
                if nonfinite_error(name, tensors[name]) is not None:
                    bad[self._sources[name]] = tensors[name]
                hash_tensor(digest, name, tensors[name])
        for name in self._dtypes:  # state_dict order, tied names too, as check_finite_weights
            if self._sources[name] in bad:
                raise nonfinite_error(name, bad[self._sources[name]])
        return digest.hexdigest()


def _sources(
    state: dict[str, torch.Tensor], index: WeightIndex
) -> tuple[dict[str, str], list[str]]:
    """``{state_dict name: name in the files}`` (a tied weight is read from whichever of its
    names the files hold), and the sorted names of the distinct tensors (a tied group counts
    once, under its first name in sorted order, as ``tensor_sha256`` counts it)."""
    groups: dict[int, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    sources = {}
    for names in groups.values():
        present = [n for n in names if n in index.specs]
        if not present:
            raise LowbitError(
                f"weight {names[0]} is in no safetensors file of {index.folder}; the folder "
                "does not match its config.json (a checkpoint with renamed keys?): run without "
                "--stream"
            )
        sources.update({n: present[0] for n in names})
    return sources, sorted(min(names) for names in groups.values())


def _owner_runs(names: list[str], table: BlockTable) -> Iterator[list[str]]:
    """Consecutive runs of ``names`` with the same owner (one decoder block, or the rest)."""
    run: list[str] = []
    owner = None
    for name in names:
        key = table.block_of(name)
        if run and key != owner:
            yield run
            run = []
        owner = key
        run.append(name)
    if run:
        yield run
