"""GGUF tensor payloads: what each weight of a model is written as, in ggml's bytes.

A payload is ``(ggml type, array)``: float types as numpy ``[R, C]`` (F32, F16) or ggml's
bytes ``[R, row_bytes]`` uint8 (BF16, Q8_0 and every block type), rows = output features.
ggml blocks run along a row (the input dimension), so reordering rows (Llama's q/k rope
order) never touches a block.

Quantized linears, by stored weight:

==========================================  ===========  =================================
lowbit stored weight                        ggml type    how
==========================================  ===========  =================================
``gguf`` (GGUF block grid, e.g. q4_k)       its own      ggml bytes copied as stored
int8, symmetric, group 32, no act-order     Q8_0         ``d`` = scale, ``q`` = code - 128
int4, symmetric, group 32, no act-order     Q4_0         ``d`` = scale, nibble = code
int4, asymmetric, integer zeros, group 32,  Q4_1         ``d`` = scale, ``m`` = -scale*zero
every ``-scale*zero`` an fp16 value
anything else (other groups, act-order,     refused, or the dequantized weight in F32 with
SpQR, FP formats, ...)                      ``dequantize=True`` (exact, only larger)
==========================================  ===========  =================================

All conversions above are exact: llama.cpp computes ``d*q`` (``d*q + m``) in fp32 from
the fp16 scale ``d`` and small integer ``q``, which equals lowbit's ``scale * (code - zero)``.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.formats.granularity import Group
from lowbit.formats.packed_int import PackedIntWeight
from lowbit.nn.quant_linear import QuantLinear

Q = gguf.GGMLQuantizationType
FLOAT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
BLOCK = 32  # elements per Q8_0 / Q4_0 / Q4_1 block
EXACT = ("GGUF block weights (--weight-format gguf-...), and int8 symmetric / int4 symmetric "
         "or asymmetric integer weights in groups of 32 without act-order (Q8_0 / Q4_0 / Q4_1)")

Payload = tuple[gguf.GGMLQuantizationType, np.ndarray]


def _refuse(name: str, what: str) -> LowbitError:
    return LowbitError(
        f"layer {name}: {what}; GGUF cannot hold it exactly. Exportable: {EXACT}; "
        "re-quantize with --weight-format gguf-q4_k (or int group 32 symmetric), or pass "
        "--dequantize to write such layers as F32"
    )


def float_payload(w: torch.Tensor, ggml_type: gguf.GGMLQuantizationType) -> Payload:
    """A float tensor in ``ggml_type`` (1-D tensors always F32; Q8_0 needs rows of whole
    blocks, else F16 as llama.cpp falls back)."""
    a = w.detach().float().cpu().numpy()
    if a.ndim == 1 or ggml_type == Q.F32:
        return Q.F32, np.ascontiguousarray(a, dtype=np.float32)
    if ggml_type == Q.Q8_0 and a.shape[-1] % BLOCK:
        ggml_type = Q.F16
    if ggml_type == Q.F16:
        return Q.F16, a.astype(np.float16)
    return ggml_type, gguf.quants.quantize(a, ggml_type)


def _blocks(scale: torch.Tensor, parts: list[torch.Tensor], rows: int) -> np.ndarray:
    """uint8 ``[R, n * block_bytes]``: per group, the fp16 ``scale`` ``[R, n]`` bytes then
    each of ``parts`` (``[R, n, k]`` uint8), concatenated."""
    head = scale.to(torch.float16).contiguous().view(torch.uint8).view(rows, -1, 2)
    return torch.cat([head, *parts], dim=2).reshape(rows, -1).numpy()


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[R, n, 16]`` from codes ``[R, n, 32]`` in ``[0, 16)``: byte ``j`` holds code
    ``j`` in its low nibble and code ``j + 16`` in its high one (ggml's Q4_0/Q4_1 order)."""
    return codes[..., :16] | (codes[..., 16:] << 4)


def int_payload(name: str, w: PackedIntWeight) -> Payload:
    """The exact ggml form of an integer weight, or a LowbitError naming why there is none."""
    grid = w.grid
    if w.perm is not None:
        raise _refuse(name, "its act-order column permutation is stored")
    gran = grid.granularity
    if not isinstance(gran, Group) or gran.size != BLOCK or w.in_features % BLOCK:
        raise _refuse(name, f"{grid.bits}-bit weights {gran.describe()} ({w.in_features} "
                      "inputs) are not in blocks of 32")
    rows = w.out_features
    codes = w.codes().view(rows, -1, BLOCK)
    if grid.bits == 8 and grid.symmetric:
        q = (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
        return Q.Q8_0, _blocks(w.scales, [q], rows)
    if grid.bits == 4 and grid.symmetric:
        return Q.Q4_0, _blocks(w.scales, [_nibbles(codes)], rows)
    if grid.bits == 4 and grid.round_zero:
        m = -w.scales.float() * w.zero_points()
        if not torch.equal(m.to(torch.float16).float(), m):
            raise _refuse(name, "asymmetric int4 whose offsets -scale*zero are not fp16 values")
        offset = m.to(torch.float16).view(torch.uint8).view(rows, -1, 2)
        return Q.Q4_1, _blocks(w.scales, [offset, _nibbles(codes)], rows)
    raise _refuse(name, f"{grid.bits}-bit {'symmetric' if grid.symmetric else 'asymmetric'} "
                  "integer weights have no exact ggml type")


def gguf_block_payload(stored: object) -> Payload:
    """A GGUF block weight (kind ``gguf``: ``ggml_type`` like ``"q4_k"``, ``raw`` uint8
    ``[R, row_bytes]`` of ggml's bytes), as stored."""
    ggml_type = Q[str(stored.ggml_type).upper()]
    return ggml_type, stored.raw.contiguous().numpy()


def linear_payload(name: str, q: QuantLinear, dequantize: bool) -> Payload:
    """The payload of quantized linear ``q`` (module docstring's table)."""
    if q.act_quant is not None or q.lowrank is not None or q.reassembly is not None:
        raise LowbitError(
            f"layer {name}: activation quantization, LoRC low-rank factors or QLLM channel "
            "reassembly change what it computes; GGUF (llama.cpp) has no such layers. Export "
            "a weight-only model"
        )
    stored = q.stored_weight()
    if stored.kind == "gguf":
        return gguf_block_payload(stored)
    try:
        if isinstance(stored, PackedIntWeight):
            return int_payload(name, stored)
        raise _refuse(name, f"stored weight kind '{stored.kind}'")
    except LowbitError:
        if not dequantize:
            raise
        return float_payload(stored.dequantize(), Q.F32)  # not cached on the module


def permute_rows(payload: Payload, order: torch.Tensor) -> Payload:
    """``payload`` with its rows (output features; 1-D: elements) taken in ``order``."""
    ggml_type, a = payload
    return ggml_type, np.ascontiguousarray(a[order.numpy()])


def logical_shape(payload: Payload) -> tuple[int, ...]:
    """The tensor's shape in elements, numpy order (``[R, C]``)."""
    ggml_type, a = payload
    if a.dtype != np.uint8:
        return tuple(a.shape)
    return tuple(gguf.quant_shape_from_byte_shape(a.shape, ggml_type))
