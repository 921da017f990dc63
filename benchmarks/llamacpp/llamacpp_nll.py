"""llama.cpp's own forward and quantizer through llama-cpp-python (the llama.cpp venv's python,
benchmarks/llamacpp/setup.sh), never lowbit's:

    PY llamacpp_nll.py score MODEL.gguf WINDOWS.npy [--base BASE.gguf] [--threads 2]
    PY llamacpp_nll.py quantize SRC.gguf DST.gguf TYPE [--embd-type F16] [--output-type T]

score: WINDOWS.npy is int64 ``[n_windows, seqlen]`` (token ids, BOS included where the model
uses it); each window runs from an empty KV cache and position 0 is never a target, as in
lowbit.eval.perplexity. Prints one JSON line: nll_sum (nats, float64), tokens, ppl, windows,
seconds; with --base also the base's ppl, mean and 99th-percentile KL(base || model) per token
and the share of positions whose top token agrees. Loading the file is the "llama.cpp loads
the GGUF" check.
quantize: llama_model_quantize with pure=True (every tensor the TYPE of the ftype, llama.cpp's
own fallback for widths its blocks do not divide) and the given embedding/output types, as
``llama-quantize --pure --token-embedding-type E [--output-tensor-type O] SRC DST TYPE``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import time

import llama_cpp
import numpy as np
from llama_cpp import Llama

FTYPES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K", "Q8_0": "Q8_0", "Q4_0": "Q4_0",
          "Q4_1": "Q4_1"}


def load(path: str, seqlen: int, threads: int, pre: str | None = None) -> Llama:
    """``pre``: override tokenizer.ggml.pre (the scored windows are token ids, so the
    pre-tokenizer never runs; a name this llama.cpp does not know only stops the load)."""
    overrides = {"tokenizer.ggml.pre": pre} if pre else None
    return Llama(model_path=path, n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen,
                 n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False,
                 kv_overrides=overrides)


def log_probs(llm: Llama, window: np.ndarray) -> np.ndarray:
    """float64 ``[T-1, V]`` log-softmax of the logits predicting positions 1..T-1."""
    llm.reset()
    llm.eval([int(t) for t in window])
    logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    return logits - (np.log(np.exp(logits - top).sum(axis=1, keepdims=True)) + top)


def score(args: argparse.Namespace) -> dict:
    windows = np.load(args.windows)
    n, seqlen = windows.shape
    llm = load(args.gguf, seqlen, args.threads, args.override_pre)
    base = load(args.base, seqlen, args.threads, args.override_pre) if args.base else None
    start = time.perf_counter()
    nll, nll_base, klds, same = 0.0, 0.0, [], 0
    for w in windows:
        lp = log_probs(llm, w)
        rows = np.arange(len(w) - 1)
        nll -= float(lp[rows, w[1:]].sum())
        if base is not None:
            bp = log_probs(base, w)
            nll_base -= float(bp[rows, w[1:]].sum())
            klds.append((np.exp(bp) * (bp - lp)).sum(axis=1))
            same += int((bp.argmax(axis=1) == lp.argmax(axis=1)).sum())
    tokens = n * (seqlen - 1)
    out = {"nll_sum": nll, "tokens": tokens, "ppl": math.exp(nll / tokens), "windows": n,
           "seconds": time.perf_counter() - start}
    if base is not None:
        kld = np.concatenate(klds)
        out.update({"ppl_base": math.exp(nll_base / tokens), "kld_mean": float(kld.mean()),
                    "kld_99": float(np.percentile(kld, 99)), "same_top_p": 100 * same / tokens})
    return out


def ggml_type(name: str) -> int:
    return getattr(llama_cpp, f"GGML_TYPE_{name.upper()}")


def quantize(args: argparse.Namespace) -> dict:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{FTYPES[args.type]}")
    params.nthread = args.threads
    params.pure = True
    params.token_embedding_type = ggml_type(args.embd_type)
    if args.output_type:
        params.output_tensor_type = ggml_type(args.output_type)
    rc = llama_cpp.llama_model_quantize(args.src.encode(), args.dst.encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    return {"dst": args.dst, "type": args.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score")
    s.add_argument("gguf")
    s.add_argument("windows")
    s.add_argument("--base")
    s.add_argument("--override-pre", help="tokenizer.ggml.pre to load the files with")
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("type", choices=sorted(FTYPES))
    q.add_argument("--embd-type", default="F16")
    q.add_argument("--output-type")
    for p in (s, q):
        p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(score(args) if args.cmd == "score" else quantize(args)))


if __name__ == "__main__":
    main()
