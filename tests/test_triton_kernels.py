"""Triton kernels for packed integer (INT2-8, INT3 bit streams) and block-scaled FP4 weights
against the reference dequantize-then-matmul, on awkward shapes: K a multiple of 32 (int32
word loads, 3- and 5-bit codes crossing words, a last tile past the row's end), any other K
(codes read byte by byte: odd K, 3-bit codes crossing bytes, rows starting mid-byte), rows not
a multiple of the tile, ragged last groups, groups that fill a tile or straddle tiles,
act-order permutations, asymmetric integer and fp16 zeros, split-K, M = 1, 15, 16, 17.

Without CUDA the kernels run on CPU under ``TRITON_INTERPRET=1`` (set with monkeypatch before
the kernel modules are first imported). fp32 inputs take the IEEE fp32 dot, so they must match
the fp32 reference to rounding; fp16/bf16 inputs are held against the exact fp32 product of the
same reduced input at a relative Frobenius error (codes and E2M1 values are exact in the input
dtype; statistics applied in fp32; output rounded). triton 3.9's interpreter computes
``tl.dot`` on bf16 operands wrongly (garbage of order 1e10 even for a plain bf16 x bf16 dot),
so bf16 is checked on CUDA only. A build test compiles every launched variant for sm_90 without
a GPU (compile errors, register spills). ``-m gpu`` times each kernel against fp16
``torch.matmul`` on LLaMA-7B/70B layer shapes (see docs/SPEED.md, "GPU (Triton)").
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.algorithms.spqr import SpQRConfig, spqr_solve
from lowbit.formats.blockscale import BlockScaledConfig, preset
from lowbit.formats.intq import IntGrid, rtn_quantize
from lowbit.formats.packed_block import PackedBlockWeight
from lowbit.formats.packed_int import PackedIntWeight
from lowbit.formats.packing import packed_nbytes
from lowbit.kernels import dispatch, gpu_paths
from lowbit.nn.quant_linear import QuantLinear

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed (optional; `pip install triton==3.9.0`)"
)
REDUCED_TOL = {torch.float16: 1e-3, torch.bfloat16: 5e-3}


@pytest.fixture
def device(monkeypatch) -> str:
    """``cuda`` when present, else ``cpu`` with the Triton interpreter switched on."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cuda" if CUDA else "cpu"


def _int_weight(rows, cols, bits, group, symmetric=True, round_zero=True, perm=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05 + 0.01  # offset: zeros away from mid code
    grid = IntGrid(bits, group, symmetric, round_zero)
    p = torch.randperm(cols, generator=g) if perm else None
    return PackedIntWeight.from_codes(
        *rtn_quantize(w if p is None else w[:, p], grid), grid, perm=p
    )


def _block_weight(rows, cols, config, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :3] = torch.tensor([0.0, 1e-6, -2e-3])  # tiny magnitudes: subnormal codes and scales
    return PackedBlockWeight.quantize(w, config)


def _spqr_weight(rows, cols, seed=0):
    """A 3-bit SpQR weight with act-order, a ragged last group and outliers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[torch.rand(rows, cols, generator=g) < 0.01] *= 8
    x = torch.randn(4 * cols, cols, generator=g)
    stored = spqr_solve(SpQRConfig(ragged_groups=True), w, 2 * x.T @ x / x.shape[0]).stored
    assert stored.perm is not None and stored.outlier_count > 0
    return stored


def _plan(stored, dtype, device="cuda", bias=None, act_quant=None):
    """The kernel the planners prepare for ``stored`` and activations of ``dtype``."""
    return dispatch.plan(dispatch.KernelRequest(stored, bias, act_quant, dtype,
                                                torch.device(device)))


# rows, cols, bits, group, symmetric, round_zero, act-order, block_k, split_k.
# K % 32 == 0 with block_k >= 32 reads int32 words; any other K reads codes byte by byte.
INT_CASES = {
    "int4-g32-words-split": (37, 128, 4, 32, True, True, False, 32, 2),
    "int4-per-row-words-ragged-tile": (19, 96, 4, -1, False, True, False, 64, None),
    "int3-g64-words-asym-actorder": (24, 192, 3, 64, False, True, True, 64, None),
    "int3-g64-words-ragged-fp16-zeros": (20, 160, 3, 64, False, False, False, 64, 2),
    "int3-g48-words-straddling": (33, 96, 3, 48, True, True, True, 32, None),
    "int5-g32-words-split": (17, 64, 5, 32, False, True, False, 32, 2),
    "int2-g32-words": (20, 96, 2, 32, False, True, False, 32, None),
    "int8-per-row-words": (16, 64, 8, -1, False, True, False, 32, None),
    "int4-g32-ragged-k100-bytes": (37, 100, 4, 32, True, True, False, 32, None),
    "int4-g16-odd-k-asym": (19, 53, 4, 16, False, True, False, 16, None),
    "int3-per-row-odd-k-fp16-zeros": (21, 45, 3, -1, False, False, False, 16, None),
    "int3-g16-odd-k-asym-actorder-split": (18, 61, 3, 16, False, True, True, 16, 3),
    "int2-g8": (20, 40, 2, 8, False, True, False, 16, None),
}

# rows, cols, config, block_k, split_k
FP4_CASES = {
    "none-fp16-g32-words": (37, 96, BlockScaledConfig("fp4_e2m1", 32, "fp16", "amax"), 32, 2),
    "none-fp16-g32-ragged": (37, 100, BlockScaledConfig("fp4_e2m1", 32, "fp16", "amax"), 32, None),
    "m1-g16-odd-k": (19, 53, BlockScaledConfig("fp4_e2m1", 16, "e8m0", "m1"), 16, None),
    "m1-g64-words-ragged": (19, 160, BlockScaledConfig("fp4_e2m1", 64, "e8m0", "m1"), 64, None),
    "m2-fp16-g32-split": (24, 72, BlockScaledConfig("fp4_e2m1", 32, "fp16", "m2"), 16, 2),
    "m2-fp16-g64-words": (24, 128, BlockScaledConfig("fp4_e2m1", 64, "fp16", "m2"), 64, None),
    "m2-bf16-g24-straddling": (18, 50, BlockScaledConfig("fp4_e2m1", 24, "bf16", "m2"), 16, None),
    "mxfp4-words": (21, 64, preset("mxfp4"), 32, None),
    "nvfp4-e4m3-tensor-scale": (20, 48, preset("nvfp4"), 16, None),
    "nvfp4-words-straddling": (20, 64, preset("nvfp4"), 32, None),
    "per-row-fp16-words": (17, 96, BlockScaledConfig("fp4_e2m1", -1, "fp16", "amax"), 64, None),
    "per-tensor-fp32-odd-k": (18, 31, BlockScaledConfig("fp4_e2m1", 0, "fp32", "amax"), 16, 2),
}


def _run_int(stored, x, bias, block_k, split_k):
    from lowbit.kernels.triton.int_group import int_matmul

    t = {k: v.to(x.device) for k, v in stored.tensors().items()}
    xs = x if stored.perm is None else x[:, t["perm"].long()]
    return int_matmul(xs, t["qweight"], t["scales"], t.get("zeros"), stored.grid.bits,
                      stored.grid.group_width(stored.in_features), bias, block_n=16,
                      block_k=block_k, split_k=split_k)


def _run_fp4(stored, x, bias, block_k, split_k):
    from lowbit.kernels.triton.fp4_block import fp4_matmul

    t = {k: v.to(x.device) for k, v in stored.tensors().items()}
    return fp4_matmul(x, t["qweight"], t["scales"], stored.out_features,
                      stored.config.group_size, gpu_paths.fp4_scale_kind(stored),
                      t.get("row_scales"), t.get("tensor_scale"), bias, block_n=16,
                      block_k=block_k, split_k=split_k)


def _check_fp32(run, stored, device, block_k, split_k):
    w = stored.dequantize().to(device)
    bias = torch.randn(stored.out_features, device=device)
    for m in (1, 16):
        x = torch.randn(m, stored.in_features, device=device)
        y = run(stored, x, bias, block_k, split_k)
        assert y.dtype == torch.float32 and y.shape == (m, stored.out_features)
        torch.testing.assert_close(y, x @ w.T + bias, rtol=1e-5, atol=1e-5)


def _check_reduced(run, stored, device, dtype, block_k, split_k):
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("triton 3.9's interpreter gets tl.dot on bf16 operands wrong; CUDA only")
    w = stored.dequantize().to(device)
    x = torch.randn(16, stored.in_features, device=device).to(dtype)
    y = run(stored, x, None, block_k, split_k)
    ref = x.float() @ w.T
    assert y.dtype == dtype
    assert float((y.float() - ref).norm() / ref.norm()) < REDUCED_TOL[dtype]


@needs_triton
@pytest.mark.parametrize("case", INT_CASES)
def test_int_kernel_matches_reference_fp32(case, device):
    rows, cols, bits, group, sym, rz, perm, block_k, split_k = INT_CASES[case]
    stored = _int_weight(rows, cols, bits, group, sym, rz, perm)
    _check_fp32(_run_int, stored, device, block_k, split_k)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["int4-g32-words-split", "int3-g64-words-asym-actorder",
                                  "int3-g64-words-ragged-fp16-zeros",
                                  "int3-g16-odd-k-asym-actorder-split"])
def test_int_kernel_reduced_precision(case, dtype, device):
    rows, cols, bits, group, sym, rz, perm, block_k, split_k = INT_CASES[case]
    stored = _int_weight(rows, cols, bits, group, sym, rz, perm)
    _check_reduced(_run_int, stored, device, dtype, block_k, split_k)


@needs_triton
@pytest.mark.parametrize("case", FP4_CASES)
def test_fp4_kernel_matches_reference_fp32(case, device):
    rows, cols, config, block_k, split_k = FP4_CASES[case]
    _check_fp32(_run_fp4, _block_weight(rows, cols, config), device, block_k, split_k)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["m1-g16-odd-k", "m2-fp16-g64-words", "nvfp4-words-straddling"])
def test_fp4_kernel_reduced_precision(case, dtype, device):
    rows, cols, config, block_k, split_k = FP4_CASES[case]
    _check_reduced(_run_fp4, _block_weight(rows, cols, config), device, dtype, block_k, split_k)


@needs_triton
@pytest.mark.parametrize(
    "stored,path",
    [
        (_int_weight(45, 96, 3, 32, False, True, True), "triton-int3"),
        (_int_weight(40, 70, 4, 64), "triton-int4"),
        (_block_weight(45, 96, preset("fp4_m2")), "triton-fp4"),
        (_spqr_weight(37, 100), "triton-spqr"),
    ],
    ids=["int3-actorder", "int4-ragged", "fp4-m2", "spqr-actorder-outliers"],
)
def test_cuda_planner_kernel_matches_quant_linear(stored, path, device):
    """The prepared CUDA kernel (what dispatch attaches to a layer on a CUDA device) equals
    the layer's reference path, for leading batch dims and M = 17 (a 32-row tile)."""
    layer = QuantLinear(stored, torch.randn(stored.out_features))
    layer.set_kernel_mode("reference")
    kernel = _plan(stored, torch.float32, bias=layer.bias)
    assert kernel is not None and kernel.path == path
    assert set(kernel.state_dict()) == set()  # nothing of it is ever saved
    assert not kernel.accepts(torch.randn(2, stored.in_features))  # CPU inputs: CPU paths
    kernel.to(device)
    for lead in [(3, 5), (17,)]:
        x = torch.randn(*lead, stored.in_features)
        torch.testing.assert_close(kernel(x.to(device)).cpu(), layer(x), rtol=1e-5, atol=1e-5)
    if CUDA:  # the dispatcher picks it on its own for CUDA inputs
        layer = layer.cuda()
        layer.set_kernel_mode("auto")
        x = torch.randn(2, stored.in_features, device="cuda")
        torch.testing.assert_close(layer(x), kernel(x), rtol=0, atol=0)
        assert dispatch.path_name(layer) == path


def test_cuda_planners_decline_what_they_do_not_run():
    mxfp8 = _block_weight(8, 32, preset("mxfp8"))  # FP8 elements: not the FP4 kernel
    e5m2 = _block_weight(8, 32, BlockScaledConfig("fp4_e2m1", 16, "fp8_e5m2", "amax"))
    for stored in (mxfp8, e5m2):
        assert gpu_paths.fp4_scale_kind(stored) is None
        assert _plan(stored, torch.float16) is None
    int4 = _int_weight(8, 32, 4, 16)
    assert _plan(int4, torch.float64) is None
    assert _plan(int4, torch.float32, "cpu") is None  # unchanged
    cuda_int4 = _plan(int4, torch.float16)
    assert (cuda_int4 is not None) == HAS_TRITON


def test_fp8_planner_comes_first_for_fp8_activations(monkeypatch):
    """On a GPU with FP8 tensor cores (pretended here) a block-scaled M2 weight behind an FP8
    activation quantizer gets the FP8 kernel before the Triton FP4 one; without activation
    quantization (or with an integer one) the Triton kernel, as before."""
    from lowbit.kernels import fp8_gpu
    from lowbit.nn.act_quant import ActQuantizer

    monkeypatch.setattr(fp8_gpu, "availability", lambda: (True, "pretend"))
    monkeypatch.setattr(fp8_gpu.FP8Weight, "to", lambda self, device: self)  # stays on CPU
    stored = _block_weight(32, 64, preset("fp4_m2"))
    fp8 = _plan(stored, torch.bfloat16, act_quant=ActQuantizer("fp8_e4m3"))
    assert fp8 is not None and fp8.path == "fp8" and fp8.quantizes_input
    for act in (None, ActQuantizer("int8")):
        kernel = _plan(stored, torch.bfloat16, act_quant=act)
        assert (kernel and kernel.path) == ("triton-fp4" if HAS_TRITON else None)


def test_importing_the_model_code_does_not_import_triton():
    code = "import sys, lowbit.nn.quant_linear; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_triton
def test_code_decoders_match_the_formats_layer(device):
    """E2M1 elements and E8M0/E4M3 scales decoded in the kernels, every code, bit for bit
    (NaN codes included)."""
    from lowbit.formats.element import get_format
    from lowbit.kernels.triton.common import decode_codes

    codes = torch.arange(256, dtype=torch.uint8)
    for kind, name in [("e2m1", "fp4_e2m1"), ("e8m0", "e8m0"), ("e4m3", "fp8_e4m3")]:
        out = decode_codes(codes.to(device), kind).cpu()
        expected = get_format(name).decode(codes & 15 if kind == "e2m1" else codes)
        assert torch.equal(out.isnan(), expected.isnan()), name
        assert torch.equal(out.nan_to_num().view(torch.int32),
                           expected.nan_to_num().view(torch.int32)), name  # signed zeros too


@needs_triton
def test_kernels_compile_for_hopper_without_spills(tmp_path):
    """Every kernel variant the planners launch builds for sm_90 with the wheel's own LLVM and
    ptxas (no GPU needed) and spills no registers. Says nothing about speed."""
    ptxas = Path(importlib.util.find_spec("triton").origin).parent / "backends/nvidia/bin/ptxas"
    if not ptxas.exists():
        pytest.skip("this triton wheel ships no ptxas (no NVIDIA backend)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, "-m", "lowbit.kernels.triton.aot", "--json"],
                         env=env, capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    assert len(rows) >= 15 and {r["arch"] for r in rows} == {"sm_90"}
    assert [r["variant"] for r in rows if r["spill_bytes"]] == []
    assert all(r["registers"] <= 255 and r["shared_bytes"] < 100_000 for r in rows)


@needs_triton
def test_launch_plan_covers_k_exactly_once(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from lowbit.kernels.triton.common import launch_plan

    for m, n, k, group, split in [(1, 64, 4096, 128, 7), (16, 40, 100, 32, 3), (17, 16, 53, 16,
                                                                                  None)]:
        plan = launch_plan(m, n, k, torch.device("cpu"), group, split_k=split)
        assert plan.k_split % plan.block_k == 0
        assert (plan.split_k - 1) * plan.k_split < k <= plan.split_k * plan.k_split
        assert plan.block_m >= min(m, 16) and plan.block_m % 16 == 0
    assert launch_plan(1, 64, 4096, torch.device("cpu"), 64).block_k == 64  # group-sized tiles


# ---- GPU timing (-m gpu) --------------------------------------------------------------------

SHAPES = {  # LLaMA layer shapes [out_features, in_features]
    "7b-attn": (4096, 4096),
    "7b-mlp-up": (11008, 4096),
    "70b-attn": (8192, 8192),
    "70b-mlp-up": (28672, 8192),
}
FORMATS = ["int4-g128-sym", "int3-g128-asym-actorder", "fp4-none-g128", "fp4-m1-g128",
           "fp4-m2-g128"]


def _random_stored(fmt: str, rows: int, cols: int, seed: int = 0):
    """A packed weight of ``fmt`` with uniformly random codes (random bytes are a valid stream
    of uniformly random codes) and plausible statistics; built on CPU."""
    g = torch.Generator().manual_seed(seed)

    def rbytes(numel, bits):
        return torch.randint(0, 256, (packed_nbytes(numel, bits),), dtype=torch.uint8,
                             generator=g)

    n_groups = -(-cols // 128)
    scales = (torch.rand(rows, n_groups, generator=g) * 0.01 + 1e-3).half()
    if fmt.startswith("int"):
        bits = int(fmt[3])
        sym = "sym" in fmt.split("-")
        zeros = None if sym else rbytes(rows * n_groups, bits)
        perm = torch.randperm(cols, generator=g).to(torch.int16) if "actorder" in fmt else None
        return PackedIntWeight(rows, cols, IntGrid(bits, 128, sym), rbytes(rows * cols, bits),
                               scales, zeros, perm)
    rule = fmt.split("-")[1]
    if rule == "none":
        config = BlockScaledConfig("fp4_e2m1", 128, "fp16", "amax")
        return PackedBlockWeight(rows, cols, config, rbytes(rows * cols, 4), scales)
    codes = torch.randint(118, 124, (rows, n_groups), dtype=torch.uint8, generator=g)
    if rule == "m1":
        config = BlockScaledConfig("fp4_e2m1", 128, "e8m0", "m1")
        return PackedBlockWeight(rows, cols, config, rbytes(rows * cols, 4), codes)
    config = BlockScaledConfig("fp4_e2m1", 128, "fp16", "m2")
    row_scales = (torch.rand(rows, generator=g) * 0.01 + 1e-3).half()
    return PackedBlockWeight(rows, cols, config, rbytes(rows * cols, 4), codes + 5, row_scales)


def _bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median")  # flushes L2 between calls


def _copy_bandwidth_gbs() -> float:
    """Device copy bandwidth (read + write bytes) of a 1 GiB buffer."""
    src = torch.empty(2**29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (_bench_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9


def _table_text(table: dict) -> str:
    lines = [
        f"copy bandwidth {table['copy_bandwidth_gbs']:.0f} GB/s on {table['device']}",
        f"{'format':<26}{'shape':>12}{'M':>4}{'kernel us':>11}{'fp16 us':>9}{'speed-up':>9}"
        f"{'GB/s':>7}{'of copy':>9}",
    ]
    for r in table["rows"]:
        lines.append(
            f"{r['format']:<26}{r['shape']:>12}{r['batch']:>4}{r['kernel_us']:>11.1f}"
            f"{r['fp16_us']:>9.1f}{r['speedup_vs_fp16']:>9.2f}{r['kernel_gbs']:>7.0f}"
            f"{r['kernel_fraction_of_copy']:>9.2f}"
        )
    return "\n".join(lines)


@pytest.fixture(scope="module")
def speed_table():
    """Rows of the timing table; printed at the end (run with -s) and written to
    ``$LOWBIT_RESULTS/speed/gpu_kernels.json`` when that variable is set."""
    import triton

    table = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
             "triton": triton.__version__, "copy_bandwidth_gbs": _copy_bandwidth_gbs(),
             "rows": []}
    yield table
    print("\n" + _table_text(table))
    if os.environ.get("LOWBIT_RESULTS"):
        out = Path(os.environ["LOWBIT_RESULTS"]) / "speed" / "gpu_kernels.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(table, indent=2) + "\n")


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and CUDA), reason="needs CUDA and triton")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_kernel_speed_vs_fp16_matmul(fmt, shape, speed_table):
    rows, cols = SHAPES[shape]
    stored = _random_stored(fmt, rows, cols)
    w16 = stored.dequantize().half().cuda()
    stored = type(stored).from_stored(stored.meta(),
                                      {k: v.cuda() for k, v in stored.tensors().items()})
    kernel = _plan(stored, torch.float16)
    assert kernel is not None and kernel.accepts(torch.empty(1, cols, dtype=torch.float16,
                                                             device="cuda"))
    weight_bytes = sum(t.numel() * t.element_size() for t in stored.tensors().values())
    for batch in (1, 16):
        x = torch.randn(batch, cols, device="cuda", dtype=torch.float16) * 0.1
        y, ref = kernel(x).float(), (x @ w16.T).float()
        assert float((y - ref).norm() / ref.norm()) < 5e-3
        io_bytes = 2 * batch * (rows + cols)
        t_kernel = _bench_ms(lambda x=x: kernel(x)) * 1e-3
        t_fp16 = _bench_ms(lambda x=x: x @ w16.T) * 1e-3
        gbs = (weight_bytes + io_bytes) / t_kernel / 1e9
        speed_table["rows"].append({
            "format": fmt, "shape": f"{rows}x{cols}", "batch": batch, "path": kernel.path,
            "bits_per_weight": stored.bits_per_weight(), "kernel_us": t_kernel * 1e6,
            "fp16_us": t_fp16 * 1e6, "speedup_vs_fp16": t_fp16 / t_kernel, "kernel_gbs": gbs,
            "kernel_fraction_of_copy": gbs / speed_table["copy_bandwidth_gbs"],
            "fp16_gbs": (2 * rows * cols + io_bytes) / t_fp16 / 1e9,
        })
