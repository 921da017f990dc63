"""Where a quantization run's time goes: cProfile of `api.quantize` on a bundled model cut to a
few blocks, summarised by stage (calibration forwards, Hessian accumulation, the method's solver).

Usage: python benchmarks/profile_quantize.py gemma3-270m --blocks 2 --method spqr \
           --settings '{"bits": 3, "outlier_threshold": 1.0, "percdamp": 0.01}' [--json FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import tempfile
import time

import torch

from lowbit import api
from lowbit.api import CalibSpec
from lowbit.models.fixtures import truncated_copy

# stage name -> (file suffix, function names) whose cumulative time is the stage's
STAGES = {
    "Hessian-collection forwards (incl. accumulation)": ("engine/context.py", "collect_hessians"),
    "  of which Hessian accumulation X^T X": ("engine/hessian.py", "add|add_gram|gram"),
    "block-output forwards (inputs of the next block)": ("engine/context.py", "run"),
    "solver (per-linear quantization)": ("algorithms/", "{method}_solve"),
    "  of which SpQR's leave-one-out outlier search": ("algorithms/spqr.py", "leave_one_out_gain"),
    "  of which inverse-Hessian Cholesky": ("algorithms/gptq.py", "inverse_hessian_cholesky"),
    "capture of the first block's inputs": ("engine/capture.py", "capture_block_inputs"),
    "per-layer reports (weight and output error)": ("algorithms/linearwise.py", "relative_errors"),
    "finite-weights check": ("engine/guards.py", "check_finite_weights"),
}


def stage_seconds(stats: pstats.Stats, method: str) -> dict[str, float]:
    """Cumulative seconds per stage of :data:`STAGES` (functions matched by file and name)."""
    out = dict.fromkeys(STAGES, 0.0)
    for (path, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        for stage, (suffix, name) in STAGES.items():
            if suffix in path and func in name.format(method=method).split("|"):
                out[stage] += ct
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--method", default="spqr")
    p.add_argument("--settings", default="{}", help="method settings as JSON")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = api.load_model(str(truncated_copy(args.model, args.blocks, tmp)))
        calib = CalibSpec("austen-emma", args.nsamples, args.seqlen, 0)
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        api.quantize(loaded, api.build_config(args.method, json.loads(args.settings)), calib,
            progress=False)
        profile.disable()
        total = time.perf_counter() - start
    stages = stage_seconds(pstats.Stats(profile), args.method)
    print(f"| stage | s | share |\n|---|---|---|\n| total ({args.blocks} blocks) | {total:.1f} | |")
    for stage, sec in stages.items():
        print(f"| {stage} | {sec:.1f} | {sec / total:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "total_s": total, "stages_s": stages,
                       "uptime": os.popen("uptime").read().strip()}, f, indent=2)


if __name__ == "__main__":
    main()
