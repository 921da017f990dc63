"""llama.cpp's (ggml's) block layouts: the types, the byte packing of their fields and the exact
decode.

A ggml row runs along a weight's input dimension and is a sequence of blocks (32 elements, or a
256-element super-block for the K types). Every type decodes one sub-block of ``sub`` elements
as ``S * (q - zero) + M`` with an unsigned code ``q`` (``bits`` wide), a per-sub-block scale
``S`` and, for the types with a min, an offset ``M``:

========  =====  =====  ====================================================  ================
type      block  bytes  stored fields (in byte order)                          S, M
========  =====  =====  ====================================================  ================
q8_0      32     34     d fp16, qs int8[32]                                    d, 0 (zero 128)
q4_0      32     18     d, qs[16] (nibbles: low = element j, high = j + 16)    d, 0 (zero 8)
q4_1      32     20     d, m fp16, qs[16]                                      d, m
q5_0      32     22     d, qh u32 (5th bit of element j = bit j), qs[16]       d, 0 (zero 16)
q5_1      32     24     d, m, qh, qs[16]                                       d, m
q4_k      256    144    d, dmin, scales[12] (6-bit sc, mn x 8), qs[128]        d*sc, -dmin*mn
q5_k      256    176    d, dmin, scales[12], qh[32], qs[128]                   d*sc, -dmin*mn
q6_k      256    210    ql[128], qh[64], scales int8[16], d                    d*sc, 0 (zero 32)
q3_k      256    110    hmask[32] (3rd bit), qs[64] (2 bits), scales[12], d    d*sc, 0 (zero 4)
q2_k      256    84     scales[16] (4-bit sc | 4-bit mn << 4), qs[64], d, dmin d*sc, -dmin*mn
========  =====  =====  ====================================================  ================

:func:`decode` computes these with the float operations (and their order) of gguf-py's numpy
dequantizers, so its results equal ``gguf.quants.dequantize`` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK_K = 256


@dataclass(frozen=True)
class GGMLType:
    """One ggml block type: ``block`` elements in ``nbytes`` bytes; sub-blocks of ``sub``
    elements share a scale; codes are ``bits`` wide and decode as ``S * (q - zero) + M``
    (``affine``: the type stores a min, so ``M`` is not 0)."""

    name: str
    block: int
    nbytes: int
    sub: int
    bits: int
    zero: int
    affine: bool
    segments: tuple[str, ...]

    @property
    def super_block(self) -> bool:
        """A K type: sub-block scales quantized against fp16 ``d`` (and ``dmin``)."""
        return self.block == QK_K

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / self.block

    def row_bytes(self, cols: int) -> int:
        return cols // self.block * self.nbytes


TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("q8_0", 32, 34, 32, 8, 128, False, ("d", "q8")),
        GGMLType("q4_0", 32, 18, 32, 4, 8, False, ("d", "nib16")),
        GGMLType("q4_1", 32, 20, 32, 4, 0, True, ("d", "m", "nib16")),
        GGMLType("q5_0", 32, 22, 32, 5, 16, False, ("d", "qh32", "nib16")),
        GGMLType("q5_1", 32, 24, 32, 5, 0, True, ("d", "m", "qh32", "nib16")),
        GGMLType("q4_k", QK_K, 144, 32, 4, 0, True, ("d", "m", "kscales", "nib32")),
        GGMLType("q5_k", QK_K, 176, 32, 5, 0, True, ("d", "m", "kscales", "qh5k", "nib32")),
        GGMLType("q6_k", QK_K, 210, 16, 6, 32, False, ("ql6", "qh6", "sc8", "d")),
        GGMLType("q3_k", QK_K, 110, 16, 3, 4, False, ("hmask", "q2s", "sc6", "d")),
        GGMLType("q2_k", QK_K, 84, 16, 2, 0, True, ("sc4", "q2s", "d", "m")),
    )
}


def ggml_type(name: str) -> GGMLType:
    """The type named ``name`` (lowercase, e.g. ``"q4_k"``); ValueError for another name."""
    if name not in TYPES:
        raise ValueError(f"unknown ggml type '{name}'; known: {', '.join(TYPES)}")
    return TYPES[name]


@dataclass
class BlockFields:
    """The fields of ``R`` ggml rows of ``C`` elements, unpacked.

    q: uint8 ``[R, C]`` unsigned codes. d: fp16 ``[R, C // block]``. m: fp16 ``[R, C // block]``
    (``m`` of q4_1/q5_1, ``dmin`` of the K types) or ``None``. sc: ``[R, C // sub]`` sub-block
    scales (uint8 6-bit for q4_k/q5_k, 4-bit for q2_k; int8 for q6_k, and for q3_k its 6-bit
    stored value minus 32) or ``None``; mn: uint8 ``[R, C // sub]`` sub-block mins (6-bit
    q4_k/q5_k, 4-bit q2_k) or ``None``.
    """

    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    mn: torch.Tensor | None = None


def sub_params(t: GGMLType, f: BlockFields) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every sub-block's ``S`` and ``M`` (``None`` for types without a min), fp32
    ``[R, C // sub]``, computed as llama.cpp computes them (``d * sc`` and ``dmin * mn`` in
    fp32)."""
    d = f.d.float()
    if not t.super_block:
        return d, f.m.float() if t.affine else None
    per = QK_K // t.sub
    rows = d.shape[0]
    scale = (d[:, :, None] * f.sc.float().view(rows, -1, per)).view(rows, -1)
    if not t.affine:
        return scale, None
    offset = -(f.m.float()[:, :, None] * f.mn.float().view(rows, -1, per)).view(rows, -1)
    return scale, offset


def decode_codes(
    q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, zero: int
) -> torch.Tensor:
    """``S * (q - zero) + M`` for codes ``q`` ``[R, n]`` and per-element ``S``, ``M``
    ``[R, n]`` (broadcastable), fp32: the one decode GPTQ's feedback and :func:`decode` share."""
    values = scale * (q.float() - zero)
    return values if offset is None else values + offset


def element_params(t: GGMLType, f: BlockFields) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`sub_params` repeated over each sub-block's elements: fp32 ``[R, C]``."""
    scale, offset = sub_params(t, f)
    scale = scale.repeat_interleave(t.sub, dim=1)
    return scale, None if offset is None else offset.repeat_interleave(t.sub, dim=1)


def decode(t: GGMLType, f: BlockFields) -> torch.Tensor:
    """fp32 ``[R, C]``: the values llama.cpp dequantizes ``f`` to."""
    return decode_codes(f.q, *element_params(t, f), t.zero)


# -- byte packing: each segment of a block, to and from its bytes -------------------------------

def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """fp16 ``[R, nb]`` -> uint8 ``[R, nb, 2]`` (little-endian)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).view(*x.shape, 2)


def _f16_from(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``[R, nb, 2]`` -> fp16 ``[R, nb]``."""
    return b.contiguous().view(torch.float16).squeeze(-1)


def _nibbles(q: torch.Tensor, width: int) -> torch.Tensor:
    """Pairs of ``width`` codes ``[..., 2 * width * k]`` (low 4 bits) into ``[..., width * k]``
    bytes: the first ``width`` codes in low nibbles, the next ``width`` in high nibbles."""
    pairs = (q & 0xF).view(*q.shape[:-1], -1, 2, width)
    return (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).flatten(-2)


def _from_nibbles(b: torch.Tensor, width: int) -> torch.Tensor:
    groups = b.view(*b.shape[:-1], -1, 1, width)
    return torch.cat([groups & 0xF, groups >> 4], dim=-2).flatten(-3)


def _bit_planes(values: torch.Tensor, nbits: int, planes: int, width: int) -> torch.Tensor:
    """``[..., planes * width]`` values of ``nbits`` bits -> ``[..., width]`` bytes, plane ``p``
    in bits ``p * nbits ..``."""
    v = values.view(*values.shape[:-1], planes, width).to(torch.int32)
    shifts = (torch.arange(planes, dtype=torch.int32, device=values.device) * nbits)[:, None]
    return (v << shifts).sum(dim=-2).to(torch.uint8)


def _from_bit_planes(b: torch.Tensor, nbits: int, planes: int) -> torch.Tensor:
    shifts = (torch.arange(planes, dtype=torch.uint8, device=b.device) * nbits)[:, None]
    planes_ = (b[..., None, :] >> shifts) & ((1 << nbits) - 1)
    return planes_.flatten(-2)


def _kscales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """6-bit sub-scales and mins ``[R, nb, 8]`` -> the 12 bytes of q4_k/q5_k ``[R, nb, 12]``."""
    lo_sc, hi_sc, lo_mn, hi_mn = sc[..., :4], sc[..., 4:], mn[..., :4], mn[..., 4:]
    return torch.cat([lo_sc | ((hi_sc >> 4) << 6), lo_mn | ((hi_mn >> 4) << 6),
                      (hi_sc & 0xF) | ((hi_mn & 0xF) << 4)], dim=-1)


def _from_kscales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, m, md = b[..., :4], b[..., 4:8], b[..., 8:]
    sc = torch.cat([d & 0x3F, (md & 0xF) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q3_scales(sc: torch.Tensor) -> torch.Tensor:
    """q3_k's 16 signed scales ``[R, nb, 16]`` (int8 in ``[-32, 31]``) -> its 12 bytes: the low
    4 bits of ``sc + 32`` as nibbles (byte ``j``: scales ``j`` and ``j + 8``), the top 2 bits
    in bytes 8..11 (scale ``j`` in byte ``8 + j % 4``, bits ``2 * (j // 4)``)."""
    stored = (sc.to(torch.int16) + 32).to(torch.uint8)
    return torch.cat([_nibbles(stored, 8), _bit_planes(stored >> 4, 2, 4, 4)], dim=-1)


def _from_q3_scales(b: torch.Tensor) -> torch.Tensor:
    stored = _from_nibbles(b[..., :8], 8) | (_from_bit_planes(b[..., 8:], 2, 4) << 4)
    return (stored.to(torch.int16) - 32).to(torch.int8)


SEGMENT_BYTES = {"d": 2, "m": 2, "q8": 32, "nib16": 16, "qh32": 4, "kscales": 12, "qh5k": 32,
                 "nib32": 128, "ql6": 128, "qh6": 64, "sc8": 16, "hmask": 32, "q2s": 64,
                 "sc6": 12, "sc4": 16}


def _encode_segment(name: str, t: GGMLType, f: BlockFields, nb: int) -> torch.Tensor:
    """Segment ``name`` of every block, uint8 ``[R, nb, SEGMENT_BYTES[name]]``."""
    rows = f.q.shape[0]
    q = f.q.view(rows, nb, t.block)
    if name in ("d", "m"):
        return _f16_bytes(f.d if name == "d" else f.m)
    if name == "q8":
        return q ^ 0x80  # code q - 128 as int8, viewed as uint8
    if name in ("nib16", "nib32"):
        return _nibbles(q, 16 if name == "nib16" else 32)
    if name in ("qh32", "qh5k"):
        planes, width = (8, 4) if name == "qh32" else (8, 32)
        high = (q >> 4) & 1
        if name == "qh32":  # 32 bits, little-endian: byte k bit b = element 8k + b
            high = high.view(rows, nb, 4, 8).transpose(-1, -2).reshape(rows, nb, 32)
        return _bit_planes(high, 1, planes, width)
    if name == "kscales":
        return _kscales(f.sc.view(rows, nb, 8), f.mn.view(rows, nb, 8))
    if name == "ql6":
        return _nibbles(q, 64)
    if name == "qh6":
        high = (q >> 4).view(rows, nb, 2, 128)
        return _bit_planes(high, 2, 4, 32).view(rows, nb, 64)
    if name == "sc8":
        return f.sc.view(rows, nb, 16).view(torch.uint8)
    if name == "q2s":  # per 128 elements, 32 bytes: element 32 p + l in bits 2p of byte l
        return _bit_planes((q & 3).view(rows, nb, 2, 128), 2, 4, 32).view(rows, nb, 64)
    if name == "hmask":  # element 32 p + l in bit p of byte l
        return _bit_planes(q >> 2, 1, 8, 32)
    if name == "sc6":
        return _q3_scales(f.sc.view(rows, nb, 16))
    if name == "sc4":
        return (f.sc | (f.mn << 4)).view(rows, nb, 16)
    raise ValueError(f"unknown segment '{name}'")


def encode(t: GGMLType, f: BlockFields) -> torch.Tensor:
    """The exact ggml bytes of ``f``: uint8 ``[R, C // block * nbytes]``."""
    rows, cols = f.q.shape
    if cols % t.block:
        raise ValueError(f"{t.name} rows hold multiples of {t.block} elements, got {cols}")
    nb = cols // t.block
    parts = [_encode_segment(s, t, f, nb) for s in t.segments]
    return torch.cat(parts, dim=-1).reshape(rows, nb * t.nbytes)


def unpack(t: GGMLType, raw: torch.Tensor, cols: int) -> BlockFields:
    """The fields of ``raw`` uint8 ``[R, C // block * nbytes]`` (``C = cols``)."""
    rows, nb = raw.shape[0], cols // t.block
    if cols % t.block or raw.shape[1] != nb * t.nbytes:
        raise ValueError(f"{t.name}: {raw.shape[1]} bytes per row do not hold {cols} elements")
    blocks = raw.view(rows, nb, t.nbytes)
    seg: dict[str, torch.Tensor] = {}
    at = 0
    for s in t.segments:
        seg[s] = blocks[..., at : at + SEGMENT_BYTES[s]]
        at += SEGMENT_BYTES[s]
    f = BlockFields(raw.new_empty(0), _f16_from(seg["d"]))
    if "m" in seg:
        f.m = _f16_from(seg["m"])
    if "q8" in seg:
        q = seg["q8"] ^ 0x80
    elif "nib16" in seg:
        q = _from_nibbles(seg["nib16"], 16)
        if "qh32" in seg:
            bits = _from_bit_planes(seg["qh32"], 1, 8)  # [.., 8 * 4]: plane b of byte k
            q = q | (bits.view(rows, nb, 8, 4).transpose(-1, -2).reshape(rows, nb, 32) << 4)
    elif "nib32" in seg:
        q = _from_nibbles(seg["nib32"], 32)
        if "qh5k" in seg:
            q = q | (_from_bit_planes(seg["qh5k"], 1, 8) << 4)
    elif "q2s" in seg:
        q = _from_bit_planes(seg["q2s"].reshape(rows, nb, 2, 32), 2, 4).reshape(rows, nb, QK_K)
        if "hmask" in seg:
            q = q | (_from_bit_planes(seg["hmask"], 1, 8) << 2)
    else:  # q6_k
        high = _from_bit_planes(seg["qh6"].reshape(rows, nb, 2, 32), 2, 4)
        q = _from_nibbles(seg["ql6"], 64) | (high.reshape(rows, nb, QK_K) << 4)
    f.q = q.reshape(rows, cols)
    if "kscales" in seg:
        sc, mn = _from_kscales(seg["kscales"])
        f.sc, f.mn = sc.reshape(rows, -1), mn.reshape(rows, -1)
    if "sc8" in seg:
        f.sc = seg["sc8"].contiguous().view(torch.int8).reshape(rows, -1)
    if "sc6" in seg:
        f.sc = _from_q3_scales(seg["sc6"]).reshape(rows, -1)
    if "sc4" in seg:
        f.sc, f.mn = (seg["sc4"] & 0xF).reshape(rows, -1), (seg["sc4"] >> 4).reshape(rows, -1)
    return f
