"""lowbit's round-to-nearest onto llama.cpp block types against llama.cpp's own quantizer.

Calls ``ggml_quantize_chunk`` of a built libggml-base (llama.cpp's C quantizers, with and
without an importance matrix) through ctypes, on the same rows lowbit quantizes, and compares
the errors and how many rows come out byte-identical, for every lowbit GGUF type (q8_0 ...
q6_k, q3_k, q2_k; the K types only on rows of multiples of 256). Rows: SmolLM2-135M block 0's
seven linears (importance: the Hessian diagonal from 16 x 128 Emma tokens, which is llama.cpp's
imatrix up to a factor) and a Gaussian 256 x 1536 matrix with a random importance.

Usage: LOWBIT_LIBGGML=/path/to/libggml-base.so .venv/bin/python
       benchmarks/gguf_rtn_vs_llamacpp.py [--out results/gguf_formats/rtn_vs_llamacpp.json]
(libggml-base.so comes with any llama.cpp build, e.g. the llama-cpp-python venv's
vendor/llama.cpp/build-*/bin/.) Errors: sum of squared errors weighted by the importance
(1 without it) relative to the same-weighted sum of squares.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from lowbit import api
from lowbit.data.calibration import calibration_batch
from lowbit.data.corpora import load_text
from lowbit.engine.context import first_block_layers
from lowbit.formats.gguf_blocks import GGUF_TYPES, GGUFBlockWeight, quantize_rows
from lowbit.formats.gguf_layout import TYPES
from lowbit.models.fixtures import truncated_copy

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def load_ggml(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    return lib


def llamacpp_rows(lib, w: torch.Tensor, name: str, importance: torch.Tensor | None):
    """llama.cpp's bytes for ``w`` ``[R, C]`` as a :class:`GGUFBlockWeight`."""
    rows, cols = w.shape
    t = TYPES[name]
    src = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    dst = np.zeros((rows, t.row_bytes(cols)), dtype=np.uint8)
    imat = None if importance is None else np.ascontiguousarray(importance.numpy(), np.float32)
    qtype = int(getattr(GGMLQuantizationType, name.upper()))
    size = lib.ggml_quantize_chunk(qtype, src.ctypes.data, dst.ctypes.data, 0, rows, cols,
                                   None if imat is None else imat.ctypes.data)
    assert size == dst.size, (size, dst.size)
    return GGUFBlockWeight(rows, cols, name, torch.from_numpy(dst))


def rel_err(w, q, importance):
    weight = torch.ones(w.shape[1]) if importance is None else importance
    return float((((q - w) ** 2) * weight).sum() / ((w**2) * weight).sum())


def smollm2_layers() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    path = Path(os.environ.get("LOWBIT_BENCH_TMP", "/tmp")) / "smollm2-1block"
    if not path.exists():
        truncated_copy("smollm2-135m", 1, path)
    loaded = api.load_model(str(path))
    ids = calibration_batch(loaded.tokenizer, load_text("austen-emma"), 16, 128, 0,
                            loaded.add_bos)
    layers = first_block_layers(loaded.model, loaded.table, ids, LINEARS)
    return {n: (w, torch.diag(h)) for n, (w, h) in layers.items()}


def compare(lib, w, importance, name):
    out = {}
    for label, imp in (("ref", None), ("imatrix", importance)):
        ours, theirs = quantize_rows(w, name, imp), llamacpp_rows(lib, w, name, imp)
        out[label] = {
            "lowbit": rel_err(w, ours.dequantize(), imp),
            "llamacpp": rel_err(w, theirs.dequantize(), imp),
            "rows_identical": float((ours.raw == theirs.raw).all(dim=1).float().mean()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/gguf_formats/rtn_vs_llamacpp.json")
    args = parser.parse_args()
    lib_path = os.environ.get("LOWBIT_LIBGGML")
    if not lib_path:
        raise SystemExit("set LOWBIT_LIBGGML to a llama.cpp build's libggml-base.so")
    lib = load_ggml(lib_path)
    torch.manual_seed(0)
    sets = {"gaussian": (torch.randn(256, 1536), torch.rand(1536) ** 4)}
    sets.update({f"smollm2.{n}": v for n, v in smollm2_layers().items()})
    results, table = [], []
    for set_name, (w, importance) in sets.items():
        for name in GGUF_TYPES:
            if w.shape[1] % TYPES[name].block:
                continue
            res = compare(lib, w, importance, name)
            results.append({"rows": set_name, "type": name, **res})
            table.append((set_name, name, res))
    print(f"{'rows':28} {'type':5} | {'ref: lowbit':>11} {'llama.cpp':>10} {'same':>5} | "
          f"{'imatrix: lowbit':>15} {'llama.cpp':>10} {'same':>5}")
    for set_name, name, res in table:
        r, i = res["ref"], res["imatrix"]
        print(f"{set_name:28} {name:5} | {r['lowbit']:11.4e} {r['llamacpp']:10.4e} "
              f"{r['rows_identical']:5.2f} | {i['lowbit']:15.4e} {i['llamacpp']:10.4e} "
              f"{i['rows_identical']:5.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    out.write_text(json.dumps({"libggml": lib_path, "uptime": uptime, "results": results},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
