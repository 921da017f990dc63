"""Next-token NLL of token windows under llama.cpp's own forward (llama-cpp-python).

Runs with the llama.cpp venv's python (benchmarks/llamacpp/setup.sh), never lowbit's:
    LLAMACPP_PY llamacpp_nll.py MODEL.gguf WINDOWS.npy [--threads 2]
WINDOWS.npy is int64 ``[n_windows, seqlen]`` (token ids, BOS included where the model uses it).
Each window is evaluated from an empty KV cache; position 0 is never a target, exactly like
lowbit.eval.perplexity. Prints one JSON line: nll_sum (nats, float64), tokens, ppl, windows,
n_vocab, seconds. Loading the file at all is the "llama.cpp loads the GGUF" check.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
from llama_cpp import Llama


def window_nll(llm: Llama, window: np.ndarray) -> float:
    """Sum over positions 1..T-1 of ``-log softmax(logits[t-1])[window[t]]`` in float64."""
    llm.reset()
    llm.eval([int(t) for t in window])
    logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)  # [T-1, V]
    top = logits.max(axis=1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    picked = logits[np.arange(len(window) - 1), window[1:]]
    return float((logz - picked).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("windows")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    windows = np.load(args.windows)
    n, seqlen = windows.shape
    llm = Llama(
        model_path=args.gguf,
        n_ctx=seqlen,
        n_batch=seqlen,
        n_ubatch=seqlen,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=True,
        verbose=False,
    )
    start = time.perf_counter()
    total = sum(window_nll(llm, w) for w in windows)
    tokens = n * (seqlen - 1)
    print(json.dumps({
        "nll_sum": total, "tokens": tokens, "ppl": math.exp(total / tokens), "windows": n,
        "n_vocab": llm.n_vocab(), "seconds": time.perf_counter() - start,
    }))


if __name__ == "__main__":
    main()
