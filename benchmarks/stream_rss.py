"""Peak resident memory of `lowbit quantize` with and without --stream, by model depth.

SmolLM2-135M cut to 6, 12 and 18 blocks (and whole, 30): each setting runs `lowbit quantize`
in a fresh process (RTN, 4 bits, group 64, small calibration, one thread) and takes its peak
RSS (ru_maxrss from wait4, read by a small wrapper process: Linux carries a parent's peak into
its child across exec, so a child of this driver, which has loaded the model, would report the
driver's peak) and the pre-flight estimate from its --json report. Three variants: the normal
run, --stream, and --stream with MALLOC_MMAP_THRESHOLD_=131072 (every allocation of 128 KiB or
more its own mapping: no heap fragmentation, more page faults; see lowbit.memory.trim_heap).
Prints a markdown table and writes results/scale/stream_rss.json.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream_rss.py [--blocks 6 12 18 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

MIB = 2**20
MEASURE = (  # run argv[1:] with output to `log`, print its peak RSS (KiB)
    "import os, subprocess, sys; log = open(sys.argv[1], 'wb'); "
    "p = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT); "
    "_, s, u = os.wait4(p.pid, 0); print(u.ru_maxrss); sys.exit(os.waitstatus_to_exitcode(s))"
)
VARIANTS = {  # label: (--stream, extra environment)
    "normal": (False, {}),
    "stream": (True, {}),
    "stream+mmap128k": (True, {"MALLOC_MMAP_THRESHOLD_": "131072"}),
}


def main() -> None:
    args = _parse()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.blocks:
        folder = _model(n, work)
        for variant in VARIANTS:
            row = _run(folder, n, variant, args, work)
            rows.append(row)
            print(f"{n:2d} blocks, {variant}: peak {row['peak_rss_mib']:.0f} MiB "
                  f"(estimate {row['estimate_peak_mib']:.0f}), {row['seconds']:.1f} s",
                  file=sys.stderr)
    _table(rows)
    result = {
        "benchmark": "stream_rss",
        "model": "smollm2-135m (truncated copies)",
        "method": "rtn",
        "settings": {"bits": 4, "group_size": 64, "nsamples": args.nsamples,
                     "seqlen": args.seqlen, "threads": 1},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "rows": rows,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten: {out}", file=sys.stderr)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[6, 12, 18])
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--workdir", default="runs/scale/stream_rss")
    p.add_argument("--json", default="results/scale/stream_rss.json")
    return p.parse_args()


def _model(n_blocks: int, work: Path) -> Path:
    """The bundled SmolLM2 folder (30 blocks) or a copy cut to ``n_blocks``."""
    from lowbit.models.bundled import prepare
    from lowbit.models.fixtures import truncated_copy

    if n_blocks == 30:
        return prepare("smollm2-135m")
    return truncated_copy("smollm2-135m", n_blocks, work / f"smollm2-{n_blocks}b")


def _run(folder: Path, n_blocks: int, variant: str, args, work: Path) -> dict:
    """One `lowbit quantize` in a fresh process; its peak RSS and report."""
    stream, extra_env = VARIANTS[variant]
    out = work / f"q-{n_blocks}-{variant}"
    report = out.with_suffix(".json")
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "lowbit.cli.main", "quantize", str(folder), "--method", "rtn",
            "--bits", "4", "-g", "64", "--nsamples", str(args.nsamples), "--seqlen",
            str(args.seqlen), "--out", str(out), "--json", str(report)]
    argv += ["--stream"] if stream else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           **extra_env}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURE, str(work / "last.log"), *argv],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"run failed, see {work / 'last.log'}")
    seconds = time.perf_counter() - start
    data = json.loads(report.read_text())
    shutil.rmtree(out, ignore_errors=True)
    weights = (folder / "model.safetensors").stat().st_size
    return {
        "blocks": n_blocks,
        "variant": variant,
        "stream": stream,
        "peak_rss_mib": int(done.stdout.split()[-1]) / 1024,
        "estimate_peak_mib": data["preflight"]["peak_bytes"] / MIB,
        "estimate": data["preflight"],
        "model_file_mib": weights / MIB,
        "seconds": seconds,
        "quantize_seconds": data["seconds"],
    }


def _table(rows: list[dict]) -> None:
    by = {(r["blocks"], r["variant"]): r for r in rows}
    print("| blocks | fp32 weights MiB | peak RSS MiB: normal | --stream | --stream, mmap 128k "
          "| estimate MiB: normal | --stream | seconds: normal | --stream | --stream, mmap 128k |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in sorted({r["blocks"] for r in rows}):
        normal, streamed, strict = (by[(n, v)] for v in VARIANTS)
        cells = [n, normal["model_file_mib"]]
        cells += [r["peak_rss_mib"] for r in (normal, streamed, strict)]
        cells += [normal["estimate_peak_mib"], streamed["estimate_peak_mib"]]
        cells += [r["quantize_seconds"] for r in (normal, streamed, strict)]
        print("| " + " | ".join(str(c) if isinstance(c, int) else f"{c:.0f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
