"""Load every lowbit export vLLM supports in vLLM (CPU build) and compare its prompt
log-probabilities with lowbit's own model of the same weights, on the same token ids.

For each export: ``lowbit quantize`` (smollm2-135m, small calibration) and ``lowbit export``
run as subprocesses of this worktree's lowbit; lowbit's log-probabilities come from
``load_model(DIR)`` (the quantized lowbit DIR, fp32); vLLM runs in its own venv
(benchmarks/vllm/setup.sh) through ``benchmarks/vllm/vllm_worker.py``, which reports the
quantization scheme and linear kernel vLLM chose (from its modules and its log), the load time
and the prompt log-probabilities (``SamplingParams(prompt_logprobs=0, max_tokens=1)``). Where
the CPU build lacks the kernel, the worker runs the forward with a plain-torch stand-in for
that one op, fed by vLLM's own loaded and repacked tensors ("reference").

Usage (from the repository root, lowbit's venv):
    python benchmarks/vllm/vllm_check.py [--only NAME ...] [--tokens 320] [--nsamples 16]
Env: VLLM_VENV (default /work/venvs/vllm). Writes results/export/vllm.json; exports and lowbit
DIRs go to runs/vllm/ (kept between runs: an existing folder is reused).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "runs" / "vllm"
MODEL = "smollm2-135m"
USING = re.compile(r"Using \w+ for [\w ,-]+")


@dataclass(frozen=True)
class Export:
    """One export to check: the lowbit DIR it comes from (quantize flags) and its format."""

    name: str
    source: str
    quantize: tuple[str, ...]
    fmt: str
    dtype: str = "float32"
    folder: str = ""  # export folder name when another row made it (default: name)

    @property
    def calibrated(self) -> bool:
        return "rtn" not in self.quantize


GPTQ = ("--method", "gptq", "--bits", "4", "-g", "64", "--static-groups")
SQ = ("--method", "smoothquant", "--bits", "8", "--abits", "8", "-g", "-1", "--sym")
EXPORTS = (
    Export("ct-rtn-w4g64-sym", "rtn-w4g64-sym", ("--method", "rtn", "--bits", "4", "-g", "64"),
           "compressed-tensors"),
    Export("ct-rtn-w4g64-sym-bf16", "rtn-w4g64-sym", ("--method", "rtn", "--bits", "4", "-g", "64"),
           "compressed-tensors", "bfloat16", "ct-rtn-w4g64-sym"),
    Export("ct-rtn-w4g64-asym", "rtn-w4g64-asym",
           ("--method", "rtn", "--bits", "4", "-g", "64", "--asym"), "compressed-tensors"),
    Export("gptq-rtn-w4g64-sym", "rtn-w4g64-sym", ("--method", "rtn", "--bits", "4", "-g", "64"),
           "gptq", "bfloat16"),  # vLLM's auto_gptq takes fp16/bf16 only
    Export("ct-gptq-w4g64-sym", "gptq-w4g64-sym", GPTQ, "compressed-tensors"),
    Export("gptq-gptq-w4g64-sym", "gptq-w4g64-sym", GPTQ, "gptq", "bfloat16"),
    Export("ct-rtn-w8ch-sym", "rtn-w8ch-sym", ("--method", "rtn", "--bits", "8", "-g", "-1"),
           "compressed-tensors"),
    Export("gptq-rtn-w8ch-sym", "rtn-w8ch-sym", ("--method", "rtn", "--bits", "8", "-g", "-1"),
           "gptq", "bfloat16"),
    Export("ct-zqfp-w8a8-fp8", "zqfp-w8a8-fp8",
           ("--method", "zqfp", "--weight-format", "fp8_e4m3", "--act-format", "fp8_e4m3",
            "-g", "-1"), "compressed-tensors"),
    Export("ct-zqfp-w4a8-int4-fp8", "zqfp-w4a8-int4-fp8",
           ("--method", "zqfp", "--weight-format", "int4", "--act-format", "fp8_e4m3",
            "-g", "128"), "compressed-tensors"),
    Export("ct-sq-w8a8-int8-token", "sq-w8a8-token", SQ + ("--act-symmetric",),
           "compressed-tensors"),
    Export("ct-zqfp-w8a8-int8-tensor", "zqfp-w8a8-int8-tensor",
           ("--method", "zqfp", "--weight-format", "int8", "--act-format", "int8",
            "--act-granularity", "tensor", "-g", "-1"), "compressed-tensors"),
)


def lowbit_cli(*args: str) -> None:
    """Run ``lowbit`` from this worktree as a subprocess (its output goes to ours)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "lowbit.cli.main", *args], check=True, env=env, cwd=ROOT)


def prepare(exp: Export, nsamples: int) -> tuple[Path, Path]:
    """The lowbit DIR and the export folder of ``exp``, made when missing."""
    src, out = RUNS / exp.source, RUNS / (exp.folder or exp.name)
    if not (src / "lowbit.json").exists():
        calib = (("--nsamples", str(nsamples), "--seqlen", "128") if exp.calibrated
                 else ("--nsamples", "2", "--seqlen", "64"))  # RTN reads no calibration
        lowbit_cli("quantize", MODEL, *exp.quantize, *calib, "--out", str(src))
    if not (out / "config.json").exists():
        lowbit_cli("export", str(src), "--format", exp.fmt, "--out", str(out))
    return src, out


def token_ids(n: int) -> list[int]:
    """The first ``n`` token ids of Pride and Prejudice's first chapter (BOS first when the
    tokenizer adds one), by the base model's tokenizer."""
    from transformers import AutoTokenizer

    from lowbit import api
    from lowbit.data.corpora import load_text

    text = load_text("austen-pp")
    start = text.find("It is a truth universally acknowledged")
    tok = AutoTokenizer.from_pretrained(api.model_path(MODEL))
    ids = tok(text[start:start + 8 * n])["input_ids"]
    return ids[:n]


def lowbit_logprobs(src: Path, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t = 1..n-1 from lowbit's fp32 model of the DIR ``src``."""
    from lowbit import api

    model = api.load_model(str(src)).model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def run_vllm(export_dir: Path, ids: list[int], venv: Path, timeout: int, dtype: str,
             avx2: bool = False, reuse: bool = False) -> dict:
    """The worker's JSON report for one export (its own venv, a fresh process); ``avx2``: vLLM
    loads its AVX2 build; ``reuse``: read the report of an earlier run when there is one."""
    tag = f".vllm-{dtype}" + ("-avx2" if avx2 else "")
    out, log = export_dir.with_suffix(tag + ".json"), export_dir.with_suffix(tag + ".log")
    if not (reuse and out.exists()):
        out.unlink(missing_ok=True)
        args = [str(venv / "bin" / "python"), str(ROOT / "benchmarks/vllm/vllm_worker.py"),
                str(export_dir), "--ids", json.dumps(ids), "--out", str(out),
                "--dtype", dtype] + ["--avx2"] * avx2
        with log.open("w") as f:
            try:
                proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                      env=dict(os.environ, PYTHONPATH=""), cwd="/tmp")
            except subprocess.TimeoutExpired:
                return {"loaded": False, "error": f"worker timed out after {timeout} s"}
        if not out.exists():
            tail = log.read_text().strip().splitlines()[-3:]
            return {"loaded": False, "error": f"worker exit {proc.returncode}: {' | '.join(tail)}"}
    report = json.loads(out.read_text())
    report["log"] = sorted({m.group(0) for m in USING.finditer(log.read_text())})
    return report


def compare(ours: list[float], theirs: list[float]) -> dict:
    """Agreement of two log-probability lists over the same tokens."""
    a, b = torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64)
    d = (a - b).abs()
    return {"mean_abs_dlogprob": d.mean().item(), "max_abs_dlogprob": d.max().item(),
            "ppl_lowbit": math.exp(-a.mean().item()), "ppl_vllm": math.exp(-b.mean().item()),
            "tokens": len(ours)}


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = ("| export | vLLM scheme | vLLM linear kernel | ran | mean / max abs d logprob "
            "| ppl vLLM | ppl lowbit | load s |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        ran = r.get("mode") or ("not loaded: " + r.get("error", "")[:120])
        scheme = " / ".join(r.get("schemes") or r.get("methods") or ["-"])
        kernel = " / ".join(r.get("kernels") or ["-"])
        lines.append(
            f"| {r['export']} ({r.get('dtype', '-')}) | {scheme} | {kernel} | {ran} "
            f"| {fmt(r.get('mean_abs_dlogprob'), '.1e')} / {fmt(r.get('max_abs_dlogprob'), '.1e')} "
            f"| {fmt(r.get('ppl_vllm'), '.4f')} | {fmt(r.get('ppl_lowbit'), '.4f')} "
            f"| {fmt(r.get('load_s'), '.1f')} |")
    return "\n".join(lines)


def merge(files: list[str], out: Path) -> None:
    """Rows of several runs (run in parallel, one export each) into one JSON, in EXPORTS order."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    by_name = {r["export"]: r for run in runs for r in run["rows"]}
    rows = [by_name[e.name] for e in EXPORTS if e.name in by_name]
    meta = {**runs[0]["meta"], "uptime": [run["meta"]["uptime"] for run in runs]}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(table(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="export names to run (default: all)")
    ap.add_argument("--tokens", type=int, default=320)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per vLLM worker")
    ap.add_argument("--avx2", nargs="*", default=[],
                    help="exports (int4, WNA16) also run on vLLM's AVX2 build")
    ap.add_argument("--reuse", action="store_true",
                    help="use the vLLM reports of earlier runs where present")
    ap.add_argument("--merge", nargs="*", metavar="JSON",
                    help="join the rows of earlier runs' JSON files (in EXPORTS order) into --json")
    ap.add_argument("--prepare-only", action="store_true", help="quantize and export only")
    ap.add_argument("--json", default=str(ROOT / "results/export/vllm.json"))
    args = ap.parse_args()
    venv = Path(os.environ.get("VLLM_VENV", "/work/venvs/vllm"))
    if args.merge:
        merge(args.merge, Path(args.json))
        return
    if args.prepare_only:
        for exp in EXPORTS:
            if not args.only or exp.name in args.only:
                try:
                    prepare(exp, args.nsamples)
                except subprocess.CalledProcessError as e:
                    print(f"{exp.name}: lowbit exit {e.returncode}", flush=True)
        return
    ids = token_ids(args.tokens)
    old = {}
    if Path(args.json).exists():
        old = {r["export"]: r for r in json.loads(Path(args.json).read_text())["rows"]}
    rows = []
    for exp in EXPORTS:
        if args.only and exp.name not in args.only:
            if exp.name in old:
                rows.append(old[exp.name])
            continue
        row: dict = {"export": exp.name, "format": exp.fmt,
                     "quantize": f"lowbit quantize {MODEL} {' '.join(exp.quantize)}"}
        try:
            src, out = prepare(exp, args.nsamples)
        except subprocess.CalledProcessError as e:
            rows.append({**row, "error": f"lowbit refused: exit {e.returncode}"})
            continue
        t0 = time.perf_counter()
        rep = run_vllm(out, ids, venv, args.timeout, exp.dtype, reuse=args.reuse)
        row.update({k: v for k, v in rep.items() if not k.endswith("logprobs")},
                   worker_s=time.perf_counter() - t0)
        if rep.get("logprobs"):
            ours = lowbit_logprobs(src, ids)
            row.update(compare(ours, rep["logprobs"]))
            if rep.get("reference_logprobs"):
                ref = compare(ours, rep["reference_logprobs"])
                row["reference"] = ref
                row["native_vs_reference_max"] = compare(
                    rep["logprobs"], rep["reference_logprobs"])["max_abs_dlogprob"]
            if exp.name in args.avx2 and any("WNA16" in k for k in rep.get("kernels", [])):
                rep2 = run_vllm(out, ids, venv, args.timeout, exp.dtype, avx2=True,
                                reuse=args.reuse)
                row["avx2"] = {k: v for k, v in rep2.items() if not k.endswith("logprobs")}
                if rep2.get("logprobs"):
                    row["avx2"].update(compare(ours, rep2["logprobs"]))
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    meta = {"model": MODEL, "tokens": len(ids), "text": "austen-pp, chapter 1",
            "nsamples": args.nsamples, "uptime": uptime,
            "cpu_flags": sorted({f for f in Path("/proc/cpuinfo").read_text().split()
                                 if f.startswith("avx512") or f == "avx2"})}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
