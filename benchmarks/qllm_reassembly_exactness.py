"""QLLM claim: channel reassembly without quantization leaves every block's output unchanged.

For every decoder block of a bundled model (full precision, calibration windows of Emma): the
inputs of q/k/v, gate/up and down are reassembled at the threshold that adds 10% channels (QLLM's
cap), the linears run in full precision on the reassembled input and weight, and the block's
output is compared with the original's: relative error ||y' - y|| / ||y|| with disassembly alone
(exact in real arithmetic) and with the pair assembly (QLLM's approximation, which keeps the
width). Prints the worst block and the median, and writes JSON.

Usage: python benchmarks/qllm_reassembly_exactness.py [--model smollm2-135m] [--windows 4]
       [--json results/qllm/<model>/reassembly_exactness.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from lowbit import api
from lowbit.algorithms.qllm import reassembled_groups
from lowbit.algorithms.reassembly import ReassembledLinear, build_plan, threshold_candidates
from lowbit.algorithms.wa_quant import input_stats
from lowbit.data.calibration import calibration_batch
from lowbit.data.corpora import load_text
from lowbit.engine.capture import block_output, capture_block_inputs
from lowbit.engine.context import BlockContext
from lowbit.models.arch import get_blocks


@torch.no_grad()
def block_errors(ctx: BlockContext, assemble: bool) -> float:
    """Relative output error of block ``ctx`` with every reassembled input at the 10% cap."""
    x = ctx.hidden[0]
    call = ctx.inputs.call_for(ctx.index, x)
    reference = block_output(ctx.block, x, call)
    originals = {}
    groups = [g for g in ctx.table.sequential if g[0] in reassembled_groups(ctx.table)]
    for group in groups:
        stats = input_stats(ctx, group[0], 2048)
        theta = threshold_candidates(stats.absmax, int(0.1 * stats.absmax.numel()), 2)[-1]
        weight = torch.cat([ctx.module(n).weight for n in group])
        plan = build_plan(stats.sample, stats.absmax, weight, theta, assemble)
        for name in group:
            originals[name] = ctx.module(name)
            ctx.replace(name, ReassembledLinear(originals[name], plan))
    try:
        out = block_output(ctx.block, x, call)
    finally:
        for name, module in originals.items():
            ctx.replace(name, module)
    return float((out - reference).norm() / reference.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    loaded = api.load_model(args.model)
    ids = calibration_batch(loaded.tokenizer, load_text("austen-emma"), args.windows, 512, 0,
                            loaded.add_bos)
    blocks = get_blocks(loaded.model, loaded.table)
    inputs = capture_block_inputs(loaded.model, blocks, ids, args.windows)
    hidden = inputs.hidden
    rows = []
    for i, block in enumerate(blocks):
        ctx = BlockContext(block, i, f"{loaded.table.blocks}.{i}", loaded.table, hidden, inputs)
        rows.append({"block": i, "disassembly": block_errors(ctx, False),
                     "with_assembly": block_errors(ctx, True)})
        hidden = ctx.run()
    dis = [r["disassembly"] for r in rows]
    asm = [r["with_assembly"] for r in rows]
    print(f"{args.model}: {len(rows)} blocks, relative block-output error without quantization")
    print("| reassembly | max over blocks | median |")
    print("|---|---|---|")
    print(f"| disassembly only | {max(dis):.2e} | {statistics.median(dis):.2e} |")
    print(f"| with pair assembly | {max(asm):.2e} | {statistics.median(asm):.2e} |")
    out = Path(args.json or f"results/qllm/{args.model}/reassembly_exactness.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "windows": args.windows, "blocks": rows},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
