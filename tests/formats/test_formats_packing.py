"""Dense packing: round trips, true widths, the byte layout itself."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats.packing import pack_codes, packed_nbytes, unpack_codes

LENGTHS = [1, 3, 7, 8, 9, 13, 63, 1001]


def bitstream_reference(codes: list[int], bits: int) -> bytes:
    """Little-endian bit stream: code i occupies bits [i*bits, (i+1)*bits) of one big integer."""
    value = sum(c << (i * bits) for i, c in enumerate(codes))
    return value.to_bytes(packed_nbytes(len(codes), bits), "little")


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip_and_layout(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8) * bits
    assert bytes(packed.tolist()) == bitstream_reference(codes.tolist(), bits)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_three_bit_codes_take_three_bits():
    codes = torch.randint(0, 8, (1000,), dtype=torch.uint8)
    assert pack_codes(codes, 3).numel() == 375  # 1000 * 3 / 8, not 500


def test_two_dimensional_input_packs_row_major():
    codes = torch.randint(0, 64, (5, 7), dtype=torch.uint8)
    packed = pack_codes(codes, 6)
    assert torch.equal(unpack_codes(packed, 6, 35).view(5, 7), codes)


def test_fp4_is_two_codes_per_byte_low_nibble_first():
    codes = torch.randint(0, 16, (4, 32), dtype=torch.uint8)  # rows of even length
    packed = pack_codes(codes, 4)
    flat = codes.reshape(-1)
    assert torch.equal(packed, flat[0::2] | (flat[1::2] << 4))  # compressed-tensors nvfp4 layout


def test_errors():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        pack_codes(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="expected 3"):
        unpack_codes(torch.zeros(4, dtype=torch.uint8), 3, 8)
