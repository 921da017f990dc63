"""Element formats against independent references, bit for bit.

References: torch.float8_e4m3fn / float8_e5m2 (and torch.float8_e8m0fnu), ml_dtypes float4_e2m1fn,
float6_e3m2fn, float6_e2m3fn, float8_e8m0fnu; numpy rint+clip for integers. Our ``round``
saturates, so each reference is "clamp to +-max, then cast" (torch's E5M2 cast alone overflows
to inf). Formats without NaN: ml_dtypes maps NaN to a signed zero, we keep NaN (and refuse to
encode it), so NaN inputs are compared only where the format has NaN.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from lowbit.formats import get_format
from lowbit.formats.element import format_names
from lowbit.formats.fp import FloatFormat, pow2

NP_REFS = {
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "e8m0": ml_dtypes.float8_e8m0fnu,
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
}
TORCH_REFS = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "e8m0": torch.float8_e8m0fnu,
}
FLOAT_NAMES = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "e8m0"]


def _clamp_np(name: str, x: np.ndarray) -> np.ndarray:
    """Saturate to +-max (e8m0: only from above; x <= 0 is NaN in the reference and here)."""
    fmt = get_format(name)
    lo = -np.inf if name == "e8m0" else -fmt.max
    return np.clip(x, lo, fmt.max)  # NaN passes through


def ref_np(name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float32, codes uint8) of the saturating ml_dtypes cast."""
    dt = NP_REFS[name]
    with np.errstate(invalid="ignore"):  # e8m0: NaN for x <= 0
        cast = _clamp_np(name, x.numpy()).astype(np.float32).astype(dt)
    return torch.from_numpy(cast.astype(np.float32)), torch.from_numpy(cast.view(np.uint8).copy())


def ref_torch(name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float32, codes uint8) of the saturating torch cast."""
    fmt = get_format(name)
    lo = -torch.inf if name == "e8m0" else -fmt.max
    cast = x.clamp(lo, fmt.max).to(TORCH_REFS[name])
    return cast.float(), cast.view(torch.uint8)


def assert_bits_equal(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal as float32 bit patterns (so -0.0 != 0.0), NaN positions equal."""
    ours, ref = ours.float(), ref.float()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(ours), nan), "NaN positions differ"
    o, r = ours[~nan].view(torch.int32), ref[~nan].view(torch.int32)
    bad = (o != r).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} mismatches, e.g. ours {ours[~nan][bad[:5, 0]]} " \
        f"ref {ref[~nan][bad[:5, 0]]}"


def representable(name: str) -> torch.Tensor:
    """float32 value of every code, from the reference."""
    fmt = get_format(name)
    codes = np.arange(1 << fmt.bits, dtype=np.uint8)
    return torch.from_numpy(codes.view(NP_REFS[name]).astype(np.float32))


def probes(name: str) -> torch.Tensor:
    """Every value, ties between neighbours (+-1 ulp), beyond max, fp32 subnormals."""
    fmt = get_format(name)
    vals = representable(name).double()
    finite = torch.unique(vals[torch.isfinite(vals)])
    mids = ((finite[1:] + finite[:-1]) / 2).float()
    top = finite.max().item()
    half_step = 2.0 ** (np.floor(np.log2(top)) - 1 - getattr(fmt, "mbits", 0))
    beyond = torch.tensor(  # top + half_step: the tie between max and the next (absent) value
        [top * 1.0001, top * 1.5, top * 2, top * 1e3, 3.4e38, torch.inf, top + half_step])
    tiny = fmt.min_positive * torch.tensor([0.25, 0.5, 0.75, 1.5])
    fp32_sub = torch.tensor([2.0**-149, 1e-40, 2.0**-127, 2.0**-126])
    base = torch.cat([vals.float(), mids, beyond.float(), tiny.float(), fp32_sub])
    base = base[~torch.isnan(base)]
    around = torch.cat([base, torch.nextafter(base, torch.tensor(torch.inf)),
                        torch.nextafter(base, torch.tensor(-torch.inf))])
    return torch.cat([around, -around, torch.tensor([torch.nan])])


def random_probes(name: str, n: int = 1_000_000, seed: int = 0) -> torch.Tensor:
    """Half log-uniform around the format's range, half random float32 bit patterns."""
    fmt = get_format(name)
    g = torch.Generator().manual_seed(seed)
    lo = np.log2(fmt.min_positive) - 4
    hi = np.log2(fmt.max) + 4
    e = torch.rand(n // 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    sign = torch.where(torch.rand(n // 2, generator=g) < 0.5, -1.0, 1.0).double()
    logu = (sign * torch.exp2(e)).float()
    bits = torch.randint(-(2**31), 2**31, (n - n // 2,), generator=g, dtype=torch.int64)
    return torch.cat([logu, bits.to(torch.int32).view(torch.float32)])


def comparable(name: str, x: torch.Tensor, ref) -> torch.Tensor:
    """Drop the inputs where a reference knowingly departs from our convention.

    - formats without NaN: ml_dtypes turns NaN into a signed zero; we keep NaN.
    - e8m0, both references: float32 *subnormal* inputs in (2**-127, 2**-126) go to 2**-126
      even below the midpoint 1.5 * 2**-127; we round to the nearest (2**-127 there).
    - e8m0, torch: zero and negative inputs give 2**-127 / 2**k(|x|); ml_dtypes and we give NaN.
    """
    fmt = get_format(name)
    keep = torch.ones_like(x, dtype=torch.bool)
    if not fmt.has_nan:
        keep &= ~torch.isnan(x)
    if name == "e8m0":
        keep &= ~((x > 2.0**-127) & (x < 2.0**-126))
        if ref is ref_torch:
            keep &= ~(x <= 0)
    return x[keep]


def check_against(name: str, x: torch.Tensor, ref) -> None:
    fmt = get_format(name)
    x = comparable(name, x, ref)
    ref_vals, ref_codes = ref(name, x)
    assert_bits_equal(fmt.round(x), ref_vals)
    assert_bits_equal(fmt.decode(ref_codes), ref_vals)
    codes = fmt.encode(x)
    if ref is ref_np and name == "fp8_e5m2":  # ml_dtypes' E5M2 NaN is 0x7E, torch's 0x7F
        nan = torch.isnan(x)
        assert torch.equal(ref_codes[nan] & 0x7F, torch.full_like(ref_codes[nan], 0x7E))
        codes, ref_codes = codes[~nan], ref_codes[~nan]
    assert torch.equal(codes, ref_codes)


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_round_matches_ml_dtypes_on_probes(name):
    check_against(name, probes(name), ref_np)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "e8m0"])
def test_round_matches_torch_on_probes(name):
    check_against(name, probes(name), ref_torch)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_round_matches_torch_random(name):
    check_against(name, random_probes(name), ref_torch)


@pytest.mark.parametrize("name", ["fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "e8m0"])
def test_round_matches_ml_dtypes_random(name):
    check_against(name, random_probes(name), ref_np)


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_every_value_is_fixed_point(name):
    fmt = get_format(name)
    vals = representable(name)
    assert_bits_equal(fmt.values(), vals)
    vals = vals[~torch.isinf(vals)]  # infinities saturate to +-max (test_saturation_and_specials)
    assert_bits_equal(fmt.round(vals), vals)
    assert torch.equal(fmt.decode(fmt.encode(vals[~torch.isnan(vals)])), vals[~torch.isnan(vals)])


def test_grids_and_maxima():
    assert get_format("fp8_e4m3").max == 448.0
    assert get_format("fp8_e5m2").max == 57344.0
    assert get_format("fp6_e3m2").max == 28.0
    assert get_format("fp6_e2m3").max == 7.5
    fp4 = get_format("fp4_e2m1")
    assert fp4.max == 6.0 and fp4.bits == 4
    grid = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert torch.equal(fp4.values(), torch.tensor(grid + [-v for v in grid]))
    e8 = get_format("e8m0")
    assert e8.max == 2.0**127 and e8.min == 2.0**-127


def test_ties_go_to_even():
    fp4 = get_format("fp4_e2m1")
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 7.0])
    assert torch.equal(fp4.round(x), torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, 6.0]))
    e4m3 = get_format("fp8_e4m3")  # 464 is the tie between 448 and the (absent) 480
    assert torch.equal(e4m3.round(torch.tensor([464.0, 440.0, 17.0])),
                       torch.tensor([448.0, 448.0, 16.0]))


def test_saturation_and_specials():
    e5m2 = get_format("fp8_e5m2")
    x = torch.tensor([torch.inf, -torch.inf, 1e6, torch.nan])
    r = e5m2.round(x)
    assert torch.equal(r[:3], torch.tensor([57344.0, -57344.0, 57344.0])) and r[3].isnan()
    # torch's own cast does not saturate for E5M2: that is why the reference clamps first
    assert torch.isinf(torch.tensor([1e6]).to(torch.float8_e5m2).float()).all()
    fp4 = get_format("fp4_e2m1")
    assert fp4.round(torch.tensor([torch.nan])).isnan().all()
    with pytest.raises(ValueError, match="no NaN"):
        fp4.encode(torch.tensor([1.0, torch.nan]))
    assert torch.signbit(fp4.round(torch.tensor([-0.1]))).all()


def test_e8m0_conventions():
    e8 = get_format("e8m0")
    sub = torch.tensor([2.0**-127 * 1.2, 2.0**-127 * 1.5])  # float32 subnormal inputs
    assert torch.equal(e8.round(sub), torch.tensor([2.0**-127, 2.0**-126]))
    # both references send the first to 2**-126 (documented in docs/FORMATS.md)
    assert sub[:1].to(torch.float8_e8m0fnu).float().item() == 2.0**-126
    x = torch.tensor([1.5, 3.0, 0.75, 1.4999999, 0.0, -1.0, 1e-45, torch.inf])
    r = e8.round(x)
    assert torch.equal(r[:4], torch.tensor([2.0, 4.0, 1.0, 1.0]))  # ties round up
    assert r[4:6].isnan().all()
    assert r[6].item() == 2.0**-127 and r[7].item() == 2.0**127
    codes = e8.encode(torch.tensor([1.0, 0.0]))
    assert torch.equal(codes, torch.tensor([127, 255], dtype=torch.uint8))


@pytest.mark.parametrize("name", [f"{u}int{b}" for u in ("", "u") for b in range(2, 9)])
def test_integer_formats_match_numpy(name):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(20000, generator=g) * 2 ** fmt.bits,
                   torch.arange(-300, 300) + 0.5, torch.tensor([torch.inf, -torch.inf])])
    ref = np.clip(np.rint(x.numpy()), fmt.min, fmt.max)
    assert torch.equal(fmt.round(x), torch.from_numpy(ref))
    codes = fmt.encode(x)
    assert int(codes.max()) < 1 << fmt.bits
    assert torch.equal(fmt.decode(codes), torch.from_numpy(ref))
    lo, hi = (-(1 << (fmt.bits - 1)), (1 << (fmt.bits - 1)) - 1) if name[0] == "i" else (
        0, (1 << fmt.bits) - 1)
    assert (fmt.min, fmt.max) == (lo, hi)


def test_int_codes_follow_intq_symmetric_convention():
    from lowbit.formats.intq import quantize

    w = torch.randn(4, 64)
    scale = w.abs().amax(1, keepdim=True) / 7
    q = quantize(w, scale, torch.full_like(scale, 8.0), 4)
    assert torch.equal(get_format("int4").encode(w / scale).float(), q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", ["fp8_e4m3", "fp4_e2m1", "fp6_e2m3"])
def test_other_input_dtypes(name, dtype):
    fmt = get_format(name)
    x = random_probes(name, 20000, seed=3)
    x = x[torch.isfinite(x)].to(dtype)
    r = fmt.round(x)
    assert r.dtype == dtype
    ref = torch.from_numpy(
        np.clip(x.double().numpy(), -fmt.max, fmt.max).astype(NP_REFS[name]).astype(np.float64))
    assert_bits_equal(r.double().float(), ref.float())


def test_e8m0_float16_input_promotes():
    assert get_format("e8m0").round(torch.tensor([3.0], dtype=torch.float16)).dtype == torch.float32


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="known: .*fp8_e4m3.*int4"):
        get_format("fp3_e1m1")
    expected = {f"int{b}" for b in range(2, 9)} | {f"uint{b}" for b in range(2, 9)}
    assert expected | set(FLOAT_NAMES) <= set(format_names())


def test_float_format_validation():
    with pytest.raises(ValueError, match="one byte"):
        FloatFormat("fp9", 5, 3, 15, "ieee")
    with pytest.raises(ValueError, match="specials"):
        FloatFormat("x", 2, 1, 1, "weird")


def test_pow2_exact_over_range():
    k = torch.arange(-149, 128)
    ref = torch.from_numpy(np.ldexp(np.float32(1), k.numpy()).astype(np.float32))
    assert torch.equal(pow2(k, torch.float32), ref)
    k64 = torch.arange(-1074, 1024)
    assert torch.equal(pow2(k64, torch.float64), torch.from_numpy(np.ldexp(1.0, k64.numpy())))
