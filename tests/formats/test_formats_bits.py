"""Bit accounting equals the bytes actually stored (and saved)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from lowbit.formats.bilevel import bilevel_quantize
from lowbit.formats.bits import (
    Part,
    bilevel_parts,
    bits_per_weight,
    block_parts,
    int_grid_parts,
    lowrank_parts,
    outlier_parts,
    permutation_parts,
    tensor_parts,
)
from lowbit.formats.blockscale import PRESETS, BlockScaledConfig, preset
from lowbit.formats.intq import IntGrid, rtn_quantize
from lowbit.formats.packed_block import PackedBlockWeight
from lowbit.formats.packed_int import PackedIntWeight

SHAPES = [(64, 256), (37, 200), (5, 13)]


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("grid", [
    IntGrid(4, 128), IntGrid(3, 16, symmetric=False), IntGrid(2, -1, symmetric=False,
                                                              round_zero=False),
    IntGrid(8, 64),
])
@pytest.mark.parametrize("perm", [False, True])
def test_int_parts_equal_packed_int_weight(rows, cols, grid, perm):
    w = torch.randn(rows, cols)
    codes, scales, zeros = rtn_quantize(w, grid)
    p = PackedIntWeight.from_codes(codes, scales, zeros, grid,
                                   torch.randperm(cols) if perm else None)
    parts = int_grid_parts(grid, rows, cols, perm=perm)
    assert sum(pt.stored_bits() for pt in parts) == p.stored_bits()
    assert bits_per_weight(rows * cols, parts) == p.bits_per_weight()


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("name", list(PRESETS))
def test_block_parts_equal_packed_block_weight(rows, cols, name):
    cfg = preset(name)
    p = PackedBlockWeight.quantize(torch.randn(rows, cols), cfg)
    assert bits_per_weight(rows * cols, block_parts(cfg, rows, cols)) == p.bits_per_weight()
    assert bits_per_weight(rows * cols, tensor_parts(p.tensors())) == p.bits_per_weight()


def test_nvfp4_is_4_5_and_mxfp4_is_4_25_bits():
    rows, cols = 128, 512
    numel = rows * cols
    nv = PackedBlockWeight.quantize(torch.randn(rows, cols), preset("nvfp4"))
    assert nv.bits_per_weight() == 4.5 + 32 / numel  # + one fp32 tensor scale
    mx = PackedBlockWeight.quantize(torch.randn(rows, cols), preset("mxfp4"))
    assert mx.bits_per_weight() == 4.25
    assert bits_per_weight(numel, block_parts(preset("mxfp8"), rows, cols)) == 8.25
    m2 = BlockScaledConfig("fp4_e2m1", 128, "fp16", "m2")
    assert bits_per_weight(numel, block_parts(m2, rows, cols)) == 4 + 8 / 128 + 16 / cols


def test_spqr_layout_gives_the_papers_average_bits():
    rows, cols, beta1, beta2 = 256, 512, 16, 16
    n = cols // beta1
    for bits, expected in ((3, 3.625), (4, 4.625)):
        parts = [Part("qweight", rows * cols, bits, packed=True),
                 *bilevel_parts("scale", rows, n, 3, beta2),
                 *bilevel_parts("zero", rows, n, 3, beta2)]
        assert bits_per_weight(rows * cols, parts) == expected
        extra = permutation_parts(cols) + outlier_parts(rows, cols, nnz=1310)
        with_extra = bits_per_weight(rows * cols, parts + extra)
        assert with_extra == expected + (16 * cols + 32 * (rows + 1) + 32 * 1310) / (rows * cols)


def test_bilevel_parts_equal_stored_tensors():
    stats = torch.rand(37, 13) + 0.1
    q = bilevel_quantize(stats, bits=3, beta2=16)
    stored = sum(t.numel() * t.element_size() * 8 for t in q.tensors("s").values())
    assert sum(p.stored_bits() for p in bilevel_parts("s", 37, 13, 3, 16)) == stored


def test_lorc_rank8_at_4096_costs_0_0625_bits():
    assert bits_per_weight(4096 * 4096, lowrank_parts(4096, 4096, 8)) == 0.0625


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "fp4_m2"])
def test_saved_file_size_matches(name, tmp_path):
    from safetensors.torch import save_file

    rows, cols = 64, 256
    p = PackedBlockWeight.quantize(torch.randn(rows, cols), preset(name))
    path = tmp_path / "w.safetensors"
    save_file(p.tensors(), path)
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    json.loads(raw[8:8 + header_len])  # the header is all that is not tensor data
    payload_bits = 8 * (len(raw) - 8 - header_len)
    assert payload_bits / (rows * cols) == bits_per_weight(rows * cols,
                                                           block_parts(preset(name), rows, cols))


def test_part_validation():
    with pytest.raises(ValueError, match="whole bytes"):
        Part("x", 10, 12)
    with pytest.raises(ValueError, match="1..8"):
        Part("x", 10, 12, packed=True)
    with pytest.raises(ValueError, match="positive"):
        bits_per_weight(0, [])
    assert Part("q", 9, 3, packed=True).stored_bits() == 48  # two chunks of 8 codes
