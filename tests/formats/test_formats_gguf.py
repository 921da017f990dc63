"""llama.cpp block types: bytes and values equal gguf-py's (llama.cpp's layout), the exact
bits per weight, the fallback rule and the round-to-nearest quantizers."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from lowbit.formats.codecs import stored_weight_from
from lowbit.formats.gguf_blocks import (
    GGUF_TYPES,
    GGUFBlockWeight,
    dequantize_rows,
    fallback_type,
    quantize_rows,
)
from lowbit.formats.gguf_layout import TYPES, BlockFields, encode, unpack

pytestmark = pytest.mark.usefixtures("one_thread")

WITH_GGUF_QUANTIZER = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
BPW = {"q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q4_k": 4.5,
       "q5_k": 5.5, "q6_k": 6.5625,
       "q3_k": 3.4375, "q2_k": 2.625}


def gguf_values(raw: torch.Tensor, name: str) -> torch.Tensor:
    qtype = getattr(GGMLQuantizationType, name.upper())
    with np.errstate(all="ignore"):
        return torch.from_numpy(dequantize(raw.numpy(), qtype).astype(np.float32))


def awkward_rows(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with an all-zero block, a constant block, a tiny block, an outlier, a
    heavy-tailed row, an all-positive and an all-negative row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[0, :64] = 0
    w[1, 32:64] = 1e-3
    w[2, :32] = torch.randn(32, generator=g) * 1e-6
    w[3, 5] = 3.0
    w[4] = torch.randn(cols, generator=g) ** 3
    w[5] = w[5].abs()
    w[6] = -w[6].abs()
    return w


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_random_bytes_decode_like_gguf_py(name):
    """Any bytes (NaN and infinite fp16 scales included) decode to gguf-py's values bit for
    bit, and unpacking then packing gives the same bytes back."""
    t = TYPES[name]
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (7, t.row_bytes(512)), dtype=torch.uint8, generator=g)
    fields = unpack(t, raw, 512)
    torch.testing.assert_close(dequantize_rows(raw, name, 512), gguf_values(raw, name),
                               rtol=0, atol=0, equal_nan=True)
    assert torch.equal(encode(t, fields), raw)


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_quantized_rows_decode_like_gguf_py(name):
    w = awkward_rows(9, 768 if TYPES[name].block == 256 else 96)
    q = quantize_rows(w, name)
    assert torch.equal(q.dequantize(), gguf_values(q.raw, name))
    assert torch.isfinite(q.dequantize()).all()


@pytest.mark.parametrize("name", WITH_GGUF_QUANTIZER)
def test_reference_quantizer_bytes_equal_gguf_py(name):
    w = awkward_rows(9, 256)
    qtype = getattr(GGMLQuantizationType, name.upper())
    with np.errstate(all="ignore"):
        expected = torch.from_numpy(quantize(w.numpy(), qtype))
    assert torch.equal(quantize_rows(w, name).raw, expected)


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_bits_per_weight_is_the_raw_size(name):
    q = quantize_rows(awkward_rows(7, 512), name)
    assert q.bits_per_weight() == BPW[name] == TYPES[name].bits_per_weight()
    assert q.raw.numel() * 8 == BPW[name] * 7 * 512


def test_stored_round_trip():
    q = quantize_rows(awkward_rows(7, 256), "q4_k")
    back = stored_weight_from(q.meta(), {k: v.clone() for k, v in q.tensors().items()})
    assert isinstance(back, GGUFBlockWeight) and back.ggml_type == "q4_k"
    assert torch.equal(back.raw, q.raw) and torch.equal(back.dequantize(), q.dequantize())


def test_wrong_raw_shape_is_an_error():
    with pytest.raises(ValueError, match="uint8"):
        GGUFBlockWeight(2, 256, "q4_k", torch.zeros(2, 143, dtype=torch.uint8))
    with pytest.raises(ValueError, match="divisible by 256"):
        quantize_rows(torch.zeros(2, 96), "q6_k")


def test_fallback_follows_llama_quantize():
    assert [fallback_type(t, 576) for t in ("q4_k", "q5_k", "q6_k")] == ["q5_0", "q5_1", "q8_0"]
    assert [fallback_type(t, 1536) for t in ("q4_k", "q5_k", "q6_k")] == ["q4_k", "q5_k", "q6_k"]
    assert fallback_type("q4_0", 576) == "q4_0"
    assert fallback_type("q4_k", 80) == "f16"


def rel_err(w, q, importance=None):
    weight = torch.ones(w.shape[1]) if importance is None else importance
    return float((((q - w) ** 2) * weight).sum() / ((w**2) * weight).sum())


# relative squared error of round-to-nearest on N(0, 1) rows: a b-bit grid over ~+-2.5 sigma
# in blocks of 32 gives about 2**(-2b) * 3 at most; measured 0.0117 (q4_0) .. 5.1e-4 (q6_k),
# q3_k 0.0227, q2_k 0.0881 (importance ratios 0.71 and 0.53)
RTN_BOUND = {"q8_0": 1e-4, "q4_0": 0.02, "q4_1": 0.02, "q5_0": 0.005, "q5_1": 0.005,
             "q4_k": 0.015, "q5_k": 0.004, "q6_k": 0.001,
             "q3_k": 0.03, "q2_k": 0.11}


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_rtn_error_and_importance(name):
    """Errors in the expected range; with an importance the weighted error is lower than the
    unweighted quantizer's (measured ratios 0.55-0.85 except q8_0, which ignores it like
    llama.cpp)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 512, generator=g)
    importance = torch.rand(512, generator=g) ** 4
    plain = quantize_rows(w, name).dequantize()
    weighted = quantize_rows(w, name, importance).dequantize()
    assert rel_err(w, plain) < RTN_BOUND[name]
    if name == "q8_0":
        assert torch.equal(plain, weighted)
    else:
        assert rel_err(w, weighted, importance) < 0.95 * rel_err(w, plain, importance)


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_quantize_and_decode_stay_on_the_input_device(name):
    """Every tensor the quantizers and the decoder create follows the input's device: on the
    "meta" device a CPU-made tensor (or a host sync) raises, so this fails on any ``device=``
    left out (which would break ``--weight-format gguf-*`` on CUDA)."""
    t = TYPES[name]
    w = torch.empty(4, 512, device="meta")
    for importance in (None, torch.empty(512, device="meta")):
        q = quantize_rows(w, name, importance)
        assert q.raw.device.type == "meta" and q.raw.shape == (4, t.row_bytes(512))
        values = q.dequantize()
        assert values.device.type == "meta" and values.dtype == torch.float32
        assert unpack(t, q.raw, 512).q.device.type == "meta"


def exact_grid_fields(name: str, rows: int, cols: int) -> BlockFields:
    """Random q3_k/q2_k fields whose values the reference quantizer must find again: ``d``
    (and ``dmin``) a power of two, the largest sub-scale at its extreme level (q3_k: -32;
    q2_k: 15, and a min of 15), no sub-scale 0, and every sub-block holding code 0 (q2_k also
    code 3)."""
    g = torch.Generator().manual_seed(3)
    nb, subs = cols // 256, cols // 16
    q = torch.randint(0, 4 if name == "q2_k" else 8, (rows, subs, 16), generator=g)
    q[..., 0] = 0
    q[..., 1] = 3
    d = torch.full((rows, nb), 2.0**-7, dtype=torch.float16)
    if name == "q3_k":
        sc = torch.randint(1, 32, (rows, subs), generator=g)  # no 0: an all-zero sub-block
        sc = torch.where(torch.rand(rows, subs, generator=g) < 0.5, -sc, sc)
        sc[:, ::16] = -32
        return BlockFields(q.view(rows, cols).to(torch.uint8), d, sc=sc.to(torch.int8))
    sc = torch.randint(1, 16, (rows, subs), generator=g)
    mn = torch.randint(0, 16, (rows, subs), generator=g)
    sc[:, ::16], mn[:, ::16] = 15, 15
    dmin = torch.full((rows, nb), 2.0**-8, dtype=torch.float16)
    return BlockFields(q.view(rows, cols).to(torch.uint8), d, dmin, sc.to(torch.uint8),
                       mn.to(torch.uint8))


@pytest.mark.parametrize("name", ["q3_k", "q2_k"])
def test_values_on_a_stored_grid_quantize_back_to_its_bytes(name):
    """Values that are exactly a q3_k/q2_k decode are a fixed point of the reference
    quantizer: the same codes, sub-scales, mins and fp16 scales, so the same bytes (this pins
    the sign of q3_k's scales, its offset 4 and the 16-element sub-blocks)."""
    t = TYPES[name]
    raw = encode(t, exact_grid_fields(name, 5, 512))
    values = dequantize_rows(raw, name, 512)
    assert torch.equal(values, gguf_values(raw, name))
    assert torch.equal(quantize_rows(values, name).raw, raw)


def test_low_k_types_fall_back_to_q4_0():
    """llama-quantize stores q2_k/q3_k tensors of widths not divisible by 256 as q4_0."""
    assert [fallback_type(t, 576) for t in ("q3_k", "q2_k")] == ["q4_0", "q4_0"]
    assert [fallback_type(t, 1536) for t in ("q3_k", "q2_k")] == ["q3_k", "q2_k"]
    assert fallback_type("q2_k", 80) == "f16"
