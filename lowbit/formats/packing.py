"""Dense bit packing of integer codes: b-bit codes take exactly b bits (3-bit codes take 3).

Codes are packed little-endian in chunks of 8 codes, which fill exactly ``bits`` bytes, so the
packed size of ``n`` codes is ``ceil(n / 8) * bits`` bytes (at most ``bits - 1`` padding bytes).
"""

from __future__ import annotations

import torch


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits occupy once packed."""
    return -(-numel // 8) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes densely.

    Args:
        codes: any shape, integer values in ``[0, 2**bits)``.
        bits: 1..8.
    Returns:
        uint8 tensor of shape ``[packed_nbytes(codes.numel(), bits)]``.
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel():
        low, high = torch.aminmax(flat)
        if int(low) < 0 or int(high) >= 1 << bits:
            raise ValueError(f"codes out of range for {bits}-bit packing")
    pad = (-flat.numel()) % 8
    if 8 % bits == 0:  # whole codes per byte (1, 2, 4, 8 bits): the same bytes in uint8 math
        return _pack_bytewise(torch.nn.functional.pad(flat.to(torch.uint8), (0, pad)), bits)
    flat = torch.nn.functional.pad(flat.to(torch.int64), (0, pad)).view(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=flat.device) * bits
    word = (flat << shifts).sum(dim=1)  # [n/8] holds 8*bits <= 64 bits
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=flat.device) * 8
    return ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[nbytes]`` -> uint8 codes ``[numel]``."""
    _check_bits(bits)
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(
            f"packed buffer has {packed.numel()} bytes, expected {packed_nbytes(numel, bits)}"
        )
    if 8 % bits == 0:
        return _unpack_bytewise(packed, bits)[:numel]
    chunks = packed.reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=chunks.device) * 8
    word = (chunks << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, dtype=torch.int64, device=chunks.device) * bits
    codes = (word[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)


def _pack_bytewise(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[n]`` (n a multiple of 8) -> bytes ``[n * bits / 8]``: byte ``j`` holds codes
    ``j*k .. j*k+k-1`` (k = 8 / bits), the first in the lowest bits, which is exactly what the
    little-endian 8-code chunks of :func:`pack_codes` hold when ``bits`` divides 8."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes.clone()
    lanes = codes.view(-1, per_byte)
    out = lanes[:, 0].clone()
    for i in range(1, per_byte):
        out |= lanes[:, i] << (bits * i)
    return out


def _unpack_bytewise(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bytewise`: bytes ``[m]`` -> uint8 codes ``[m * 8 / bits]``."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed.reshape(-1).clone()
    mask = (1 << bits) - 1
    lanes = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    return torch.stack(lanes, dim=-1).reshape(-1)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
