"""LR-QAT: the merged integer model's perplexity equals the training-time fake-quantized one.

Trains LR-QAT on a bundled model, evaluates perplexity (and the logits of a fixed batch) with the
fake-quantized layers still in place just before the merge, merges into plain QuantLinears,
evaluates again and reports both, their difference and the largest logit difference. Prints a
table and writes JSON.

Usage: python benchmarks/lrqat_merge_ppl.py [--model smollm2-135m] [--bits 3] [--steps 20]
       [--max-tokens 4096] [--json results/lrqat/merge_ppl.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import lowbit.algorithms.lrqat as lrqat
from lowbit import api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--json", default="results/lrqat/merge_ppl.json")
    args = parser.parse_args()
    loaded = api.load_model(args.model)
    probe = torch.arange(1, 129).reshape(2, 64)
    seen: dict = {}

    def evaluate() -> tuple[float, torch.Tensor]:
        scores = api.evaluate(loaded, ppl=["austen-pp"], max_tokens=args.max_tokens,
                              progress=False)
        with torch.inference_mode():
            logits = loaded.model(probe).logits.float()
        return scores["ppl"]["austen-pp"], logits

    merge = lrqat.merge

    def measured_merge(model, layers, initial):
        seen["fake_quant"] = evaluate()
        return merge(model, layers, initial)

    lrqat.merge = measured_merge
    settings = {"bits": args.bits, "group_size": -1, "steps": args.steps, "batch_size": 4,
                "train_seqlen": 256, "checkpoint_every": 0}
    api.quantize(loaded, api.build_config("lrqat", settings), api.CalibSpec(nsamples=8),
        progress=False)
    lrqat.merge = merge
    fake_ppl, fake_logits = seen["fake_quant"]
    merged_ppl, merged_logits = evaluate()
    row = {
        "model": args.model, "bits": args.bits, "steps": args.steps,
        "max_tokens": args.max_tokens, "ppl_fake_quant": fake_ppl, "ppl_merged": merged_ppl,
        "ppl_rel_diff": abs(merged_ppl - fake_ppl) / fake_ppl,
        "max_abs_logit_diff": float((merged_logits - fake_logits).abs().max()),
    }
    print("| model | bits | steps | ppl fake-quant (training forward) | ppl merged | rel. diff "
          "| max logit diff |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.model} | W{args.bits} per-channel | {args.steps} | {fake_ppl:.6f} | "
          f"{merged_ppl:.6f} | {row['ppl_rel_diff']:.2e} | {row['max_abs_logit_diff']:.2e} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
