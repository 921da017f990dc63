"""lowbit vs llm-compressor 0.14.0.1 on the CPU: GPTQ W4 g64 and RTN W4 g64 on smollm2-135m.

Both tools quantize the same fp32 HF folder (lowbit's bundled model) on the same calibration
tokens (lowbit draws them; the llm-compressor worker reads their ids from a file), with the
same torch thread count, each as its own subprocess: wall time of the whole command (load,
quantize, save), the quantize step alone (as each tool times it) and the process's peak RSS
(wait4's ru_maxrss). One evaluator scores both outputs: lowbit's KL divergence to the fp32
base and perplexity on austen-pp (neither tool calibrated on it); llm-compressor's
compressed-tensors output is read back dequantized through transformers'
CompressedTensorsConfig(run_compressed=False). GPTQ runs act-order with static groups in both
(llm-compressor's actorder="static", lowbit's --static-groups), damping 0.01, 128-column blocks.

llm-compressor lives in its own venv (benchmarks/llmcompressor/setup.sh; path
$LLMCOMPRESSOR_VENV, default /work/venvs/llmcompressor), never a lowbit dependency.

Usage (repo root, lowbit's venv):
    bash benchmarks/llmcompressor/setup.sh
    python benchmarks/llmcompressor/vs_llmcompressor.py [--methods gptq rtn] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from lowbit import api
from lowbit.data.calibration import calibration_batch
from lowbit.data.corpora import load_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CALIB, SEED = "austen-emma", 0


def run_timed(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` (output to ``log``); its wall seconds and peak RSS in MiB. Raises on failure.

    The peak is the child's own ``VmHWM`` (/proc/PID/status), read every 50 ms while it runs:
    wait4's ``ru_maxrss`` would not do, as Linux carries the forking parent's resident size
    into the child's maximum across exec (a child of this 2.5 GiB process "peaks" at 2.5 GiB).
    """
    start = time.perf_counter()
    peak_kib = 0
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        while proc.poll() is None:
            peak_kib = max(peak_kib, vm_hwm_kib(proc.pid))
            time.sleep(0.05)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]}... failed ({proc.returncode}); see {log}")
    return wall, peak_kib / 1024


def vm_hwm_kib(pid: int) -> int:
    """``VmHWM`` of process ``pid`` in KiB (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def lowbit_run(method: str, args, work: Path, env: dict[str, str]) -> dict:
    out, report = work / f"lowbit-{method}", work / f"lowbit-{method}.json"
    cmd = [sys.executable, "-m", "lowbit.cli.main", "quantize", args.model, "--method", method,
           "--bits", "4", "--group-size", str(args.group), "--calib", CALIB,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(SEED),
           "--out", str(out), "--json", str(report)]
    if method == "gptq":
        cmd += ["--act-order", "--static-groups", "--percdamp", "0.01", "--block-size", "128"]
    cmd += args.lowbit_args.split()
    wall, rss = run_timed(cmd, env, work / f"lowbit-{method}.log")
    seconds = json.loads(report.read_text())["seconds"]
    return {"wall_s": wall, "quantize_s": seconds, "peak_rss_mib": rss, "out": str(out)}


def llmcompressor_run(method: str, args, work: Path, env: dict[str, str], ids_file: Path,
                      base_dir: Path) -> dict:
    python = str(Path(args.venv) / "bin" / "python")
    out, times = work / f"llmcompressor-{method}", work / f"llmcompressor-{method}-times.json"
    worker = str(HERE / "lc_worker.py")
    cmd = [python, worker, "quantize", str(base_dir), str(ids_file), method, str(args.group),
           str(out), str(times), str(args.threads)]
    wall, rss = run_timed(cmd, env, work / f"llmcompressor-{method}.log")
    dense = work / f"llmcompressor-{method}-dense"
    run_timed([python, worker, "dequantize", str(out), str(base_dir), str(dense)], env,
              work / f"llmcompressor-{method}-dequantize.log")
    return {"wall_s": wall, "quantize_s": json.loads(times.read_text())["quantize_s"],
            "peak_rss_mib": rss, "out": str(dense)}


def score(path: str, base, args) -> dict:
    """lowbit's evaluator: KLD to the fp32 base and perplexity on the eval corpus."""
    scores = api.evaluate(api.load_model(path), [args.eval_corpus], True, base,
                          args.eval_seqlen, args.eval_tokens, progress=False)
    return {"kld": scores["kld"], "ppl": scores["ppl"][args.eval_corpus],
            "top1_agreement": scores["top1_agreement"]}


@contextlib.contextmanager
def background_load(n: int):
    """``n`` busy-loop processes (one core each, at this process's priority) while inside."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in loops:
            proc.kill()
            proc.wait()


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def table(rows: list[dict]) -> str:
    head = ("| method | tool | wall s | quantize s | peak RSS MiB | KLD | ppl |\n"
            "|---|---|---|---|---|---|---|")
    lines = [f"| {r['method']} | {r['tool']} | {r['wall_s']:.1f} | {r['quantize_s']:.1f} | "
             f"{r['peak_rss_mib']:.0f} | {r['kld']:.4f} | {r['ppl']:.3f} |" for r in rows]
    return "\n".join([head, *lines])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", nargs="+", default=["gptq", "rtn"], choices=["gptq", "rtn"])
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="torch threads of both tools")
    p.add_argument("--eval-corpus", default="austen-pp")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=4096, help="evaluation token cap")
    p.add_argument("--venv", default=os.environ.get("LLMCOMPRESSOR_VENV",
                                                    "/work/venvs/llmcompressor"))
    p.add_argument("--work", default="results/speed/vs_llmcompressor_work",
                   help="outputs of both tools (not committed)")
    p.add_argument("--json", default="results/speed/vs_llmcompressor.json")
    p.add_argument("--tools", nargs="+", default=["lowbit", "llmcompressor"],
                   choices=["lowbit", "llmcompressor"], help="which tools, in this order")
    p.add_argument("--background-load", type=int, default=0, metavar="N",
                   help="run N CPU-bound busy loops (other users' jobs) beside each tool's "
                        "quantize command, as on a shared machine")
    p.add_argument("--lowbit-args", default="",
                   help="extra `lowbit quantize` flags, e.g. --no-true-sequential (one pass of "
                        "calibration per block, as llm-compressor's GPTQ)")
    p.add_argument("--reuse", action="store_true",
                   help="take the runs an interrupted benchmark finished from WORK/*-record.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    base_dir = api.model_path(args.model)
    base = api.load_model(args.model)
    ids = calibration_batch(base.tokenizer, load_text(CALIB), args.nsamples, args.seqlen, SEED,
                            base.add_bos)
    ids_file = work / "calib_ids.json"
    ids_file.write_text(json.dumps(ids.tolist()))
    load = {"start": uptime()}
    rows = []
    for method in args.methods:
        for tool in args.tools:
            record = work / f"{tool}-{method}-record.json"
            if args.reuse and record.is_file():  # a finished run of an interrupted benchmark
                row = json.loads(record.read_text())
                if "kld" not in row:
                    row.update(score(row["out"], base, args))
                    record.write_text(json.dumps(row, indent=2))
                rows.append(row)
                continue
            print(f"{method} / {tool} ... ({uptime()})", flush=True)
            with background_load(args.background_load):
                if tool == "lowbit":
                    run = lowbit_run(method, args, work, env)
                else:
                    run = llmcompressor_run(method, args, work, env, ids_file, base_dir)
            run["uptime"] = uptime()
            rows.append({"method": method, "tool": tool, **run, **score(run["out"], base, args)})
            record.write_text(json.dumps(rows[-1], indent=2))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    load["end"] = uptime()
    ratios = {}
    for method in args.methods if set(args.tools) == {"lowbit", "llmcompressor"} else []:
        lb, lc = (next(r for r in rows if r["method"] == method and r["tool"] == t)
                  for t in ("lowbit", "llmcompressor"))
        ratios[method] = {
            "wall": lb["wall_s"] / lc["wall_s"],
            "quantize": lb["quantize_s"] / lc["quantize_s"],
            "peak_rss": lb["peak_rss_mib"] / lc["peak_rss_mib"],
            "kld": lb["kld"] / lc["kld"],
        }
    print(table(rows))
    print("\n| method | wall lowbit/llm-compressor | quantize | peak RSS | KLD |\n"
          "|---|---|---|---|---|")
    for method, r in ratios.items():
        print(f"| {method} | {r['wall']:.2f} | {r['quantize']:.2f} | {r['peak_rss']:.2f} | "
              f"{r['kld']:.3f} |")
    print(f"load: {load['start']} -> {load['end']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "background_load": args.background_load,
                   "torch": torch.__version__, "uptime": load,
                   "calib_ids_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
                   "rows": rows, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
