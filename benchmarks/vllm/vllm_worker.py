"""vLLM side of benchmarks/vllm/vllm_check.py; runs in the vLLM venv (benchmarks/vllm/setup.sh).

    python vllm_worker.py EXPORT_DIR --ids '[1, 2, ...]' --out REPORT.json

Loads EXPORT_DIR with vLLM (CPU, eager, fp32 unless --dtype), records the quantization method,
scheme and linear kernel of its linear layers (walking the loaded model; the driver also reads
vLLM's own "Using ... for ..." log lines), then the prompt log-probabilities of the token ids
(``SamplingParams(prompt_logprobs=0, max_tokens=1)``): entry t is log p(ids[t+1] | ids[:t+1]).

``--avx2`` makes vLLM see a CPU without AVX-512, so it loads its AVX2 build (as on an AVX2-only
machine). Where the build lacks ``torch.ops._C.cpu_gemm_wna16`` (vLLM's int4 CPU kernel,
absent from its AVX2 build), ``vllm._custom_ops.cpu_gemm_wna16`` is replaced by
:func:`reference_wna16`, a plain-torch matmul that unpacks the tensors as vLLM's
CPUWNA16LinearKernel repacked them, and
the report says ``mode: reference``; so it does where the kernel refuses the dtype (it has
no fp32 path: the fp32 forward then runs the stand-in, a check of the layout only).
Writes the JSON report even when loading fails (``error``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # model in this process
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def reference_wna16(input, q_weight, scales, zeros, bias, pack_factor, isa_hint):
    """Plain-torch stand-in for ``torch.ops._C.cpu_gemm_wna16`` (int4 codes).

    Inverts CPUWNA16LinearKernel._process_gptq_weights_w4a16: ``q_weight`` int32
    ``[N/16, K*2]`` holds, for each block of 16 output channels, the ``[K, 16]`` codes packed
    8 per int32 along the output dim; ``scales`` ``[G, N]``; ``zeros`` None (uint4b8: code - 8)
    or int32 ``[G, N/8]`` packed along the output dim. Returns ``x @ W`` with
    ``W[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n]``, ``g(k) = k // (K / G)``; dtype of input.
    """
    import torch
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        unpack_quantized_values_into_int32,
    )
    from vllm.scalar_type import scalar_types

    assert pack_factor == 8
    n_blocks, k2 = q_weight.shape
    k = k2 * pack_factor // 16
    w = q_weight.view(n_blocks, k, 16 // pack_factor).permute(1, 0, 2).reshape(k, -1)
    q = unpack_quantized_values_into_int32(w, scalar_types.uint4, 1)  # [K, N] codes 0..15
    groups = scales.shape[0]
    if zeros is None:
        z = torch.full_like(scales, 8, dtype=torch.int32)
    else:
        z = unpack_quantized_values_into_int32(zeros, scalar_types.uint4, 1)
    rep = k // groups
    deq = (q - z.repeat_interleave(rep, 0)).float() * scales.float().repeat_interleave(rep, 0)
    x2 = input.reshape(-1, input.shape[-1]).float()
    out = x2 @ deq
    if bias is not None:
        out = out + bias.float()
    return out.to(input.dtype).reshape(*input.shape[:-1], deq.shape[1])


def describe(model) -> dict:
    """Quantization method, scheme and kernel class names over the model's linear layers."""
    from vllm.model_executor.layers.linear import LinearBase

    methods, schemes, kernels = set(), set(), set()
    for module in model.modules():
        if not isinstance(module, LinearBase):
            continue
        qm = getattr(module, "quant_method", None)
        methods.add(type(qm).__name__)
        scheme = getattr(module, "scheme", None)
        if scheme is not None:
            schemes.add(type(scheme).__name__)
        for owner in (qm, scheme):
            for attr in ("kernel", "linear_kernel", "fp8_linear", "w8a8_block_fp8_linear"):
                obj = getattr(owner, attr, None) if owner is not None else None
                if obj is not None:
                    kernels.add(type(obj).__name__)
    return {"methods": sorted(methods), "schemes": sorted(schemes), "kernels": sorted(kernels)}


def prompt_logprobs(llm, ids: list[int]) -> list[float]:
    """log p(ids[t+1] | ids[:t+1]) for t = 0..n-2, from vLLM's prompt log-probabilities."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(prompt_logprobs=0, max_tokens=1, temperature=0.0)
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
    return [lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir")
    ap.add_argument("--ids", required=True, help="JSON list of token ids")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--avx2", action="store_true",
                    help="make vLLM see no AVX-512 (it then loads its AVX2 build, _C_AVX2)")
    args = ap.parse_args()
    if args.avx2:
        import torch

        torch.cpu._is_avx512_supported = lambda: False
        torch.cpu._is_avx512_bf16_supported = lambda: False
    ids = json.loads(args.ids)
    report: dict = {"dtype": args.dtype,
                    "build": "AVX2 (_C_AVX2)" if args.avx2 else "native"}
    try:
        import torch
        import vllm
        from vllm import LLM

        report["vllm"] = vllm.__version__
        import vllm._custom_ops as ops

        report["cpu_gemm_wna16"] = hasattr(torch.ops._C, "cpu_gemm_wna16")
        # the kernel takes bf16/fp16 activations only ("not implemented for 'Float'"), and a
        # second forward after that failure did not finish in 20 min here: fp32 runs the stand-in
        native = report["cpu_gemm_wna16"] and args.dtype != "float32"
        if not native:
            ops.cpu_gemm_wna16 = reference_wna16
        t0 = time.perf_counter()
        llm = LLM(model=args.export_dir, dtype=args.dtype, enforce_eager=True,
                  max_model_len=args.max_model_len, seed=0, enable_prefix_caching=False)
        report["load_s"] = time.perf_counter() - t0
        report["loaded"] = True
        info = llm.apply_model(describe)[0]
        report.update(info)
        used = any("WNA16" in k for k in info["kernels"])
        report["mode"] = "native" if native or not used else (
            "reference" if not report["cpu_gemm_wna16"] else "reference (no fp32 kernel)")
        report["logprobs"] = prompt_logprobs(llm, ids)
        if native and used:  # the same forward with the stand-in, to check it on this kernel
            ops.cpu_gemm_wna16 = reference_wna16
            report["reference_logprobs"] = prompt_logprobs(llm, ids)
    except Exception as e:  # noqa: BLE001 - every failure goes into the report
        lines = f"{type(e).__name__}: {e}".splitlines()
        why = [x.strip() for x in lines[1:] if "Value error" in x or "cannot implement" in x]
        report["error"] = " ".join([lines[0], *why])
        report["traceback"] = traceback.format_exc()[-3000:]
    with open(args.out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
