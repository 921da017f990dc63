"""Logits of a GGUF file by llama.cpp (llama-cpp-python), for comparing an export with lowbit.

Run with the Python of a venv that has ``llama_cpp`` (not lowbit's; the llama.cpp benchmark
builds one): ``PYTHON scripts/llamacpp_logits.py FILE.gguf IDS.json OUT.npy [--threads T]``.
IDS.json is a list of token ids; OUT.npy gets float32 ``[len(ids), n_vocab]``, the logits at
every position (the model evaluated once over the whole list, no BOS added).
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf")
    p.add_argument("ids")
    p.add_argument("out")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    from llama_cpp import Llama

    ids = [int(i) for i in json.load(open(args.ids))]
    llm = Llama(model_path=args.gguf, logits_all=True, n_ctx=max(64, len(ids)),
                n_batch=max(64, len(ids)), n_threads=args.threads, verbose=False)
    llm.eval(ids)
    np.save(args.out, np.asarray(llm.scores[: len(ids)], dtype=np.float32))


if __name__ == "__main__":
    main()
