"""Ahead-of-time builds of the Triton kernels for an NVIDIA architecture, without a GPU.

``triton.compile`` lowers a kernel to PTX and a cubin with the LLVM and ptxas that ship in the
triton wheel; nothing runs. This builds the variants that :mod:`lowbit.kernels.gpu_paths`
launches for a LLaMA-7B-shaped layer (4096 x 4096, M = 16; fp16/bf16/fp32 inputs; INT4 and
INT3 on the word and byte paths, sym/asym zeros, groups that fill a tile or not, split-K; FP4
with each scale kind) and reads registers, spilled bytes and shared memory from the cubin.
It catches what the interpreter cannot (code that does not compile for the GPU, register
spills) but says nothing about speed.

    python -m lowbit.kernels.triton.aot [--arch 90]

Needs the kernels as real JIT functions: run it without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lowbit.formats.packing import packed_nbytes
from lowbit.kernels.triton import fp4_block, int_group

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
         torch.uint8: "u8", torch.int32: "i32"}
N, K, M = 4096, 4096, 16


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _int_variant(dtype, bits, group, zeros, k=K, split_k=None):
    n_groups = -(-k // group)
    z = {None: None, "codes": _meta(packed_nbytes(N * n_groups, bits), dtype=torch.uint8),
         "fp16": _meta(N, n_groups, dtype=torch.float16)}[zeros]
    return int_group._int_kernel, int_group.int_launch(
        _meta(M, k, dtype=dtype), _meta(packed_nbytes(N * k, bits), dtype=torch.uint8),
        _meta(N, n_groups, dtype=torch.float16), z, bits, group, split_k=split_k)


def _fp4_variant(dtype, group, scale_kind, row=False, tensor=False, split_k=None):
    n_groups = -(-K // group)
    scales = _meta(N, n_groups, dtype=torch.float16 if scale_kind == "float" else torch.uint8)
    return fp4_block._fp4_kernel, fp4_block.fp4_launch(
        _meta(M, K, dtype=dtype), _meta(packed_nbytes(N * K, 4), dtype=torch.uint8), scales,
        N, group, scale_kind, _meta(N, dtype=torch.float16) if row else None,
        _meta(1, dtype=torch.float32) if tensor else None, split_k=split_k)


VARIANTS: dict[str, Callable] = {
    "int4-g128-sym-fp16": lambda: _int_variant(torch.float16, 4, 128, None),
    "int4-g128-sym-bf16-split2": lambda: _int_variant(torch.bfloat16, 4, 128, None, split_k=2),
    "int4-g128-sym-fp32": lambda: _int_variant(torch.float32, 4, 128, None),
    "int4-g16-asym-fp16": lambda: _int_variant(torch.float16, 4, 16, "codes"),
    "int4-g128-bytes-k4000-fp16": lambda: _int_variant(torch.float16, 4, 128, "codes", k=4000),
    "int3-g128-asym-fp16": lambda: _int_variant(torch.float16, 3, 128, "codes"),
    "int3-g128-asym-bf16-split2": lambda: _int_variant(torch.bfloat16, 3, 128, "codes",
                                                       split_k=2),
    "int3-g64-fp16zeros-fp16": lambda: _int_variant(torch.float16, 3, 64, "fp16"),
    "int3-g48-sym-fp16": lambda: _int_variant(torch.float16, 3, 48, None),
    "fp4-none-g128-fp16": lambda: _fp4_variant(torch.float16, 128, "float"),
    "fp4-m1-g128-bf16": lambda: _fp4_variant(torch.bfloat16, 128, "e8m0"),
    "fp4-m2-g128-fp16-split2": lambda: _fp4_variant(torch.float16, 128, "e8m0", row=True,
                                                    split_k=2),
    "fp4-mx-g32-bf16": lambda: _fp4_variant(torch.bfloat16, 32, "e8m0"),
    "fp4-nvfp4-g16-fp16": lambda: _fp4_variant(torch.float16, 16, "e4m3", tensor=True),
    "fp4-m1-g128-fp32": lambda: _fp4_variant(torch.float32, 128, "e8m0"),
}


def _signature(fn, args: tuple, consts: dict) -> tuple[dict, dict]:
    """Triton signature and divisibility attributes as the JIT would specialize them
    (16-byte aligned tensors, ints divisible by 16)."""
    sig, attrs = {}, {}
    for i, (name, value) in enumerate(zip(fn.arg_names, args, strict=False)):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    sig.update({name: "constexpr" for name in consts})
    return sig, attrs


def _resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return {"registers": int(found.group(1)), "spill_bytes": int(found.group(2))}


def build(name: str, arch: int = 90) -> dict:
    """Compile variant ``name`` of :data:`VARIANTS` for ``sm_<arch>``; returns its resource use
    (registers, spill_bytes: per-thread stack, i.e. spilled registers; shared_bytes)."""
    fn, (_, args, consts) = VARIANTS[name]()
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("kernels were imported under TRITON_INTERPRET=1; run without it")
    sig, attrs = _signature(fn, args, consts)
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": 4, "num_stages": 3})
    blocks = {k: consts[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K")}
    return {"variant": name, "arch": f"sm_{arch}", **blocks, **_resources(kernel.asm["cubin"]),
            "shared_bytes": kernel.metadata.shared}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90, 80")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    rows = [build(name, args.arch) for name in VARIANTS]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['variant']:<30} {r['arch']} tile {r['BLOCK_M']}x{r['BLOCK_N']}x"
                  f"{r['BLOCK_K']} split {r['SPLIT_K']}: {r['registers']} registers, "
                  f"{r['spill_bytes']} spilled bytes, {r['shared_bytes']} B shared")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
