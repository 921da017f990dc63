"""Write one safetensors file from tensors that are never all in memory at once.

``safetensors.torch.save_file`` needs every tensor alive at the same time. A streamed
quantization keeps its quantized blocks on disk, so its output file is written in two passes
over the parts (one part = one block, or the weights outside the blocks): :meth:`add` takes each
tensor's name, dtype and shape; :meth:`open` writes the header; :meth:`write` puts each tensor's
bytes at its offset. The file is byte for byte what ``save_file`` writes for the same tensors:
the tensor order and dtype names are taken from safetensors itself (it serializes the same names
and dtypes with no data), the header is its compact JSON padded with spaces to 8 bytes.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import BinaryIO

import torch


class StreamedSafetensors:
    """A safetensors file written part by part: all :meth:`add` calls, then :meth:`open`, then
    one :meth:`write` per tensor (any order), then :meth:`close`."""

    def __init__(self, metadata: dict[str, str] | None = None) -> None:
        self.metadata = metadata
        self._specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        self._written: set[str] = set()
        self._file: BinaryIO | None = None
        self._data_start = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Register tensors (only their names, dtypes and shapes are kept)."""
        for name, t in tensors.items():
            if name in self._specs:
                raise ValueError(f"tensor {name} added twice")
            self._specs[name] = (t.dtype, tuple(t.shape))

    def open(self, path: str | Path) -> None:
        """Create ``path`` and write the header."""
        header = self._header()
        self._file = open(path, "wb")  # noqa: SIM115  (closed by close())
        self._file.write(struct.pack("<Q", len(header)) + header)
        self._data_start = 8 + len(header)

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write the bytes of added tensors at their offsets."""
        assert self._file is not None, "open() first"
        for name, t in tensors.items():
            if self._specs.get(name) != (t.dtype, tuple(t.shape)):
                raise ValueError(f"tensor {name} was not added with this dtype and shape")
            start, end = self._offsets[name]
            if end > start:
                self._file.seek(self._data_start + start)
                self._file.write(_bytes(t))
            self._written.add(name)

    def close(self) -> None:
        """Finish the file; every added tensor must have been written."""
        assert self._file is not None, "open() first"
        missing = sorted(set(self._specs) - self._written)
        total = max((end for _, end in self._offsets.values()), default=0)
        self._file.truncate(self._data_start + total)
        self._file.close()
        self._file = None
        if missing:
            raise ValueError(f"tensors never written: {missing[:3]}")

    def _header(self) -> bytes:
        """safetensors' own header for the added tensors, with their real shapes and offsets."""
        from safetensors.torch import save

        empty = {name: torch.empty(0, dtype=dtype) for name, (dtype, _) in self._specs.items()}
        raw = save(empty, metadata=self.metadata)
        (length,) = struct.unpack("<Q", raw[:8])
        order = json.loads(raw[8 : 8 + length])
        header: dict = {}
        offset = 0
        for name, entry in order.items():
            if name == "__metadata__":
                header[name] = entry
                continue
            dtype, shape = self._specs[name]
            size = dtype.itemsize * math.prod(shape)
            header[name] = {"dtype": entry["dtype"], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            self._offsets[name] = (offset, offset + size)
            offset += size
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        return text + b" " * (-len(text) % 8)


def _bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in memory order (little-endian, as safetensors stores them)."""
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())
