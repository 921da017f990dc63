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
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    pad = (-flat.numel()) % 8
    flat = torch.nn.functional.pad(flat, (0, pad)).view(-1, 8)
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
    chunks = packed.reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=chunks.device) * 8
    word = (chunks << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, dtype=torch.int64, device=chunks.device) * bits
    codes = (word[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
