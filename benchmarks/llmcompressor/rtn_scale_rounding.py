"""Why lowbit's RTN W4 g64 scores 7% above llm-compressor's in KLD on the bundled SmolLM2.

The two tools' weights differ only in the scale's precision: lowbit stores fp16 group scales
(what every export format holds) and rounds each weight with that stored scale; llm-compressor
keeps the fp32 model's scales in fp32. Same min-max rule (``scale = amax / 7.5``, codes
``clamp(round(w / scale), -8, 7)``), same groups. This script rebuilds both grids in plain torch
on the bundled fp32 smollm2-135m, plus two controls, and scores each with lowbit's evaluator
(KL divergence to the base and perplexity on austen-pp, 4096 tokens, windows of 512):

- ``fp32 scale``: llm-compressor's rule (its dequantized weights, bit for bit);
- ``fp16 scale``: lowbit's rule (lowbit's RTN output, bit for bit);
- ``codes from fp32 scale, fp16 dequantization``: the fp16 scale's own error is harmless;
  what costs is which codes the rounding picks;
- the same two grids on a copy of the model with 1% of each matrix's standard deviation of
  Gaussian noise added to its linears (seed 0), scored against that noisy copy: the bundled
  SmolLM2 is dequantized from a Q4_1 GGUF, so its weights sit on a 4-bit grid whose points the
  exact fp32 min-max scale partly meets again; weights off any grid (any bf16 checkpoint)
  show what the fp16 scale really costs.

Usage (repository root, lowbit's venv): python benchmarks/llmcompressor/rtn_scale_rounding.py
Writes results/speed/rtn_scale_rounding.json.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

from lowbit import api

GROUP, TOKENS = 64, 4096


def rtn(w: torch.Tensor, codes_scale: str, deq_scale: str) -> torch.Tensor:
    """Symmetric int4 min-max RTN of ``w`` ``[R, C]`` in groups of 64: codes rounded with the
    scale in ``codes_scale`` precision, values rebuilt with ``deq_scale`` (``fp32``/``fp16``)."""
    groups = w.float().reshape(w.shape[0], -1, GROUP)
    exact = groups.abs().amax(-1, keepdim=True) / 7.5
    as_fp16 = exact.half().float()
    pick = {"fp32": exact, "fp16": as_fp16}
    codes = torch.clamp(torch.round(groups / pick[codes_scale]), -8, 7)
    return (codes * pick[deq_scale]).reshape(w.shape)


def score(state: dict[str, torch.Tensor], base) -> dict[str, float]:
    model = api.load_model("smollm2-135m")
    model.model.load_state_dict(state)
    s = api.evaluate(model, ["austen-pp"], True, base, 512, TOKENS, progress=False)
    return {"kld": s["kld"], "ppl": s["ppl"]["austen-pp"]}


def quantized(state: dict[str, torch.Tensor], codes: str, deq: str) -> dict[str, torch.Tensor]:
    return {k: rtn(v, codes, deq) if k.endswith("_proj.weight") else v for k, v in state.items()}


def main() -> None:
    torch.set_num_threads(2)
    base = api.load_model("smollm2-135m")
    state = {k: v.clone() for k, v in base.model.state_dict().items()}
    rows = {}
    for label, codes, deq in (("fp32 scale (llm-compressor)", "fp32", "fp32"),
                              ("fp16 scale (lowbit)", "fp16", "fp16"),
                              ("codes from fp32 scale, fp16 dequantization", "fp32", "fp16")):
        rows[label] = score(quantized(state, codes, deq), base)
        print(label, rows[label], flush=True)
    gen = torch.Generator().manual_seed(0)
    noisy = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=gen)
             if k.endswith("_proj.weight") else v for k, v in state.items()}
    base.model.load_state_dict(noisy)
    for label, prec in (("noisy base: fp32 scale", "fp32"), ("noisy base: fp16 scale", "fp16")):
        rows[label] = score(quantized(noisy, prec, prec), base)
        print(label, rows[label], flush=True)
    print("\n| grid | KLD | ppl austen-pp |\n|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['kld']:.4f} | {r['ppl']:.3f} |")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    out = Path("results/speed/rtn_scale_rounding.json")
    out.write_text(json.dumps({"tokens": TOKENS, "group": GROUP, "rows": rows,
                               "uptime": uptime}, indent=2) + "\n")


if __name__ == "__main__":
    main()
