"""lowbit's GGUF (GPTQ / RTN rounded onto llama.cpp's block formats) against llama.cpp's own
quantizer (round-to-nearest, and with an importance matrix), all scored by llama.cpp itself.

Run with lowbit's python from the repository root, after benchmarks/llamacpp/setup.sh:
    .venv/bin/python benchmarks/llamacpp/gguf_vs_llamacpp.py --model smollm2-135m

Steps (each skipped when its output file exists in --work, so a rerun only redoes what is new):
 1. calibration text: the first nsamples x seqlen tokens of austen-emma, written once to
    calib.txt and given to both sides (lowbit `--calib calib.txt`, llama-imatrix `-f`);
    evaluation text: austen-pp (Pride and Prejudice), which nobody calibrates on.
 2. base: `lowbit export MODEL --format gguf --gguf-float-type f32` (the fp32 base lowbit
    quantizes), or with --base-source gguf-source llama-quantize's F32 requantization of the
    bundled model's source GGUF.
 3. lowbit: `lowbit quantize MODEL --method M --weight-format gguf-FMT --calib calib.txt`, then
    `lowbit export DIR --format gguf`.
 4. llama.cpp: `llama-quantize --pure` base -> FMT with token-embedding/output types set to what
    lowbit's export wrote (equal bits; checked tensor by tensor with gguf.GGUFReader), without
    and with `--imatrix` from `llama-imatrix` on calib.txt.
 5. every GGUF: llama-perplexity KLD to the base's logits and PPL (same ctx and chunks).
 6. agreement: lowbit's perplexity of each DIR (and the base) against llama.cpp's
    (llama-cpp-python, benchmarks/llamacpp/llamacpp_nll.py) on the same token windows.
 7. speed: llama-bench -t THREADS tg of the GGUFs beside `lowbit bench decode DIR`, one run,
    `uptime` before and after.
Prints tables and writes results/gguf/llamacpp.json (one entry per model, merged).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

VENV = Path(os.environ.get("LLAMACPP_VENV", "/work/venvs/llamacpp"))
LOWBIT = [sys.executable, "-m", "lowbit.cli.main"]
# llama-quantize type names of the GGUF formats lowbit rounds onto (lowbit name: gguf-<lower>)
PROMPT = 128  # context before the timed decode, both engines
FORMATS = ("Q4_K", "Q4_0", "Q4_1", "Q5_K", "Q6_K", "Q8_0", "Q3_K", "Q2_K")


def have_tools() -> bool:
    """The llama.cpp command-line tools are built; without them (setup.sh still compiling) the
    llama-cpp-python path is used: llama_model_quantize and the forward's logits, no imatrix,
    no llama-bench."""
    return all((VENV / "llama.cpp-bin" / t).is_file() for t in
               ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench"))


OVERRIDE_PRE: list[str] = []  # ["--override-pre", NAME] when --override-pre is given


def pyhelper(args: list[str], log: Path) -> dict:
    """Run benchmarks/llamacpp/llamacpp_nll.py with the llama.cpp venv's python; its JSON."""
    extra = OVERRIDE_PRE if args[0] == "score" else []
    out = run([str(VENV / "bin" / "python"), str(Path(__file__).with_name("llamacpp_nll.py")),
               *args, *extra], log)
    return json.loads(out.strip().splitlines()[-1])


def tool(name: str) -> str:
    path = VENV / "llama.cpp-bin" / name
    if not path.is_file():
        sys.exit(f"{path} missing: run benchmarks/llamacpp/setup.sh (LLAMACPP_VENV={VENV})")
    return str(path)


def kv_flags() -> list[str]:
    """--override-kv of the pre-tokenizer (imatrix, perplexity; llama-bench has no such flag)."""
    return ["--override-kv", f"tokenizer.ggml.pre=str:{OVERRIDE_PRE[1]}"] if OVERRIDE_PRE else []


def run(cmd: list[str], log: Path, env: dict | None = None) -> str:
    """Run ``cmd``, keep its stdout+stderr in ``log``, return it; exit with its tail on error."""
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=ROOT)
    out = proc.stdout + proc.stderr
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(out)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}) after {time.perf_counter() - start:.0f} s; "
                 f"log {log}:\n{out[-3000:]}")
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return out


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------- texts


def write_texts(work: Path, model: str, nsamples: int, seqlen: int) -> dict:
    """calib.txt = the first nsamples*seqlen tokens of austen-emma (decoded back to text);
    eval.txt = austen-pp. Returns their facts."""
    from transformers import AutoTokenizer

    from lowbit.data.corpora import load_text
    from lowbit.data.tokens import tokenize_text
    from lowbit.loading import model_path

    calib, evalf = work / "calib.txt", work / "eval.txt"
    tok = AutoTokenizer.from_pretrained(model_path(model))
    if not calib.is_file():
        ids = tokenize_text(tok, load_text("austen-emma"))[: nsamples * seqlen]
        calib.write_text(tok.decode(ids.tolist()))
    if not evalf.is_file():
        evalf.write_text(load_text("austen-pp"))
    return {"calib_file": str(calib), "calib_tokens": int(tokenize_text(tok, calib.read_text())
            .numel()), "eval_file": str(evalf), "calib_corpus": "austen-emma",
            "eval_corpus": "austen-pp"}


# ---------------------------------------------------------------- GGUF facts


def tensor_types(path: Path) -> dict[str, dict]:
    """name -> {type, elements, bytes} of every tensor of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {t.name: {"type": t.tensor_type.name, "elements": int(t.n_elements),
                     "bytes": int(t.n_bytes)} for t in reader.tensors}


def bits_summary(types: dict[str, dict], path: Path) -> dict:
    """Bits per weight: of the file, of all tensors, and of the block linears (blk.*, 2-D)."""
    total_el = sum(t["elements"] for t in types.values())
    lin = {n: t for n, t in types.items() if n.startswith("blk.") and n.endswith(".weight")
           and not n.endswith("norm.weight")}
    lin_el = sum(t["elements"] for t in lin.values())
    counts: dict[str, int] = {}
    for t in lin.values():
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    return {
        "file_bytes": path.stat().st_size,
        "bpw_file": 8 * path.stat().st_size / total_el,
        "bpw_tensors": 8 * sum(t["bytes"] for t in types.values()) / total_el,
        "bpw_linears": 8 * sum(t["bytes"] for t in lin.values()) / max(lin_el, 1),
        "linear_types": counts,
        "token_embd": types.get("token_embd.weight", {}).get("type"),
        "output": types.get("output.weight", {}).get("type"),
    }


def type_mismatches(a: dict[str, dict], b: dict[str, dict]) -> list[str]:
    """Tensors whose GGUF type differs between two files (or that only one has)."""
    names = sorted(set(a) | set(b))
    return [f"{n}: {a.get(n, {}).get('type')} vs {b.get(n, {}).get('type')}" for n in names
            if a.get(n, {}).get("type") != b.get(n, {}).get("type")]


# ---------------------------------------------------------------- producing the GGUFs


def base_gguf(work: Path, model: str, source: str) -> tuple[Path, str]:
    out = work / "base-f32.gguf"
    if out.is_file():
        return out, (work / "base-source.txt").read_text().strip()
    if source == "lowbit":
        how = export(model, out, work / "logs" / "base-export.log", ["--gguf-float-type", "f32"])
    else:
        from lowbit.models.bundled import BUNDLED

        src = BUNDLED[model].locate_gguf()
        run([tool("llama-quantize"), "--allow-requantize", str(src), str(out), "F32", "2"],
            work / "logs" / "base-requant.log")
        how = f"llama-quantize --allow-requantize {src.name} F32"
    (work / "base-source.txt").write_text(how)
    return out, how


def lowbit_gguf(work: Path, model: str, method: str, fmt: str, calib: Path,
                nsamples: int, seqlen: int, extra: list[str]) -> tuple[Path, Path]:
    name = f"lowbit-{method}-{fmt.lower()}"
    qdir, out = work / name, work / f"{name}.gguf"
    if not (qdir / "lowbit.json").is_file():
        run([*LOWBIT, "quantize", model, "--method", method, "--weight-format",
             f"gguf-{fmt.lower()}", "--calib", str(calib), "--nsamples", str(nsamples),
             "--seqlen", str(seqlen), "--out", str(qdir), "--json", str(work / f"{name}.json"),
             *extra], work / "logs" / f"{name}-quantize.log")
    if not out.is_file():
        export(str(qdir), out, work / "logs" / f"{name}-export.log", [])
    return qdir, out


def export(src: str, out: Path, log: Path, flags: list[str]) -> str:
    """`lowbit export SRC --format gguf --out OUT FLAGS`; where this checkout's command line
    has no gguf export yet, the same library call (lowbit.export.gguf_export.export_gguf)."""
    cmd = [*LOWBIT, "export", src, "--format", "gguf", "--out", str(out), *flags]
    helptext = subprocess.run([*LOWBIT, "export", "--help"], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    if "gguf" in helptext:
        run(cmd, log)
        return " ".join(["lowbit", *cmd[3:]])
    from lowbit.export.gguf_export import export_gguf

    float_type = flags[flags.index("--gguf-float-type") + 1] if flags else "f16"
    print(f"$ export_gguf({src!r}, {str(out)!r}, {float_type!r})  (no gguf in the CLI yet)")
    export_gguf(src, out, float_type)
    return f"lowbit.export.gguf_export.export_gguf({src}, float_type={float_type})"


def imatrix(work: Path, base: Path, calib: Path, nsamples: int, seqlen: int,
            threads: int) -> Path | None:
    out = work / "imatrix.gguf"
    if not have_tools():
        return None
    if not out.is_file():
        run([tool("llama-imatrix"), *kv_flags(), "-m", str(base), "-f", str(calib), "-c",
             str(seqlen), "--chunks", str(nsamples), "-t", str(threads), "-o", str(out)],
            work / "logs" / "imatrix.log")
    return out


def llama_quant(work: Path, base: Path, fmt: str, embd: str, output: str | None,
                imat: Path | None, threads: int) -> Path | None:
    tag = "imatrix" if imat else "rtn"
    out = work / f"llamacpp-{tag}-{fmt.lower()}.gguf"
    if not out.is_file() and not have_tools():
        if imat:
            return None
        flags = ["--output-type", output] if output else []
        pyhelper(["quantize", str(base), str(out), fmt, "--embd-type", embd, *flags, "--threads",
                  str(threads)], work / "logs" / f"llamacpp-{tag}-{fmt.lower()}.log")
    if not out.is_file():
        cmd = [tool("llama-quantize"), "--pure", "--token-embedding-type", embd]
        if output:
            cmd += ["--output-tensor-type", output]
        if imat:
            cmd += ["--imatrix", str(imat)]
        run([*cmd, str(base), str(out), fmt, str(threads)],
            work / "logs" / f"llamacpp-{tag}-{fmt.lower()}.log")
    return out


# ---------------------------------------------------------------- scoring


_PATTERNS = {
    "kld_mean": r"Mean\s+KLD:\s+([-\d.eE+]+)",
    "kld_99": r"99\.0%\s+KLD:\s+([-\d.eE+]+)",
    "ppl": r"Mean\s+PPL\(Q\)\s*:\s*([\d.]+)",
    "ppl_base": r"Mean\s+PPL\(base\)\s*:\s*([\d.]+)",
    "same_top_p": r"Same top p:\s*([\d.]+)",
}


def score(work: Path, gguf: Path, base_logits: Path, ctx: int, chunks: int,
          threads: int) -> dict:
    """llama-perplexity --kl-divergence of ``gguf`` against the base's saved logits."""
    log = work / "logs" / f"kld-{gguf.stem}.log"
    out = log.read_text() if log.is_file() else run(
        [tool("llama-perplexity"), *kv_flags(), "-m", str(gguf), "--kl-divergence-base",
         str(base_logits), "--kl-divergence", "-c", str(ctx), "--chunks", str(chunks), "-t",
         str(threads)], log)
    found = {k: re.search(p, out) for k, p in _PATTERNS.items()}
    return {k: float(m.group(1)) for k, m in found.items() if m}


def base_logits(work: Path, base: Path, evalf: Path, ctx: int, chunks: int,
                threads: int) -> tuple[Path, float]:
    out, log = work / "base-logits.kld", work / "logs" / "base-perplexity.log"
    text = log.read_text() if out.is_file() and log.is_file() else run(
        [tool("llama-perplexity"), *kv_flags(), "-m", str(base), "-f", str(evalf), "-c", str(ctx),
         "--chunks", str(chunks), "-t", str(threads), "--kl-divergence-base", str(out)], log)
    return out, float(re.search(r"Final estimate: PPL = ([\d.]+)", text).group(1))


def pp_windows(work: Path, model: str, seqlen: int, max_tokens: int) -> Path:
    """austen-pp cut into lowbit's evaluation windows, saved for the llama-cpp-python path."""
    import numpy as np
    from transformers import AutoTokenizer

    from lowbit.data.corpora import load_text
    from lowbit.data.tokens import tokenizer_adds_bos
    from lowbit.eval.windows import eval_windows
    from lowbit.loading import model_path

    tok = AutoTokenizer.from_pretrained(model_path(model))
    win = eval_windows(tok, load_text("austen-pp"), seqlen, max_tokens, tokenizer_adds_bos(tok))
    out = work / f"kld-windows-{seqlen}x{win.shape[0]}.npy"
    np.save(out, win.numpy())
    return out


def agreement(work: Path, pairs: list[tuple[str, str, Path]], seqlen: int, max_tokens: int,
              threads: int) -> list[dict]:
    """lowbit's perplexity of each spec vs llama.cpp's of its GGUF, on the same windows."""
    import numpy as np
    import torch

    from lowbit.data.corpora import load_text
    from lowbit.eval.perplexity import perplexity
    from lowbit.eval.windows import eval_windows
    from lowbit.loading import load_model

    torch.set_num_threads(threads)
    rows = []
    for label, spec, gguf in pairs:
        cache = work / f"agree-{label}.json"
        if cache.is_file():
            rows.append(json.loads(cache.read_text()))
            continue
        loaded = load_model(spec, torch.float32)
        win = eval_windows(loaded.tokenizer, load_text("austen-pp"), seqlen, max_tokens,
                           loaded.add_bos)
        ours = perplexity(loaded.model, win, progress=False)
        del loaded
        npy = work / "agree-windows.npy"
        np.save(npy, win.numpy())
        theirs = pyhelper(["score", str(gguf), str(npy), "--threads", str(threads)],
                          work / "logs" / f"agree-{label}.log")
        row = {"label": label, "lowbit_spec": spec, "gguf": gguf.name, "windows": ours.windows,
               "tokens": ours.tokens, "ppl_lowbit": ours.ppl, "ppl_llamacpp": theirs["ppl"],
               "nll_lowbit": ours.nll_mean, "nll_llamacpp": theirs["nll_sum"] / theirs["tokens"],
               "ppl_rel_diff": theirs["ppl"] / ours.ppl - 1}
        cache.write_text(json.dumps(row))
        rows.append(row)
    return rows


def speed(work: Path, ggufs: dict[str, Path], dirs: dict[str, Path], threads: int,
          tokens: int) -> dict:
    """llama-bench: ``tokens`` decoded after a ``PROMPT``-token context (``-d``) for every GGUF,
    then `lowbit bench decode` of each DIR (same context and token count), one run."""
    before = uptime()
    out = run([tool("llama-bench"), "-m", ",".join(str(p) for p in ggufs.values()), "-t",
               str(threads), "-p", "0", "-n", str(tokens), "-d", str(PROMPT), "-r", "3",
               "-o", "json"], work / "logs" / "llama-bench.log")
    bench = json.loads(out[out.index("["): out.rindex("]") + 1])
    by_path = {b["model_filename"]: b for b in bench}
    llama = {k: {"tokens_per_s": by_path[str(p)]["avg_ts"], "stddev": by_path[str(p)]["stddev_ts"]}
             for k, p in ggufs.items()}
    ours = {}
    for label, qdir in dirs.items():
        js = work / f"bench-decode-{label}.json"
        run([*LOWBIT, "bench", "decode", str(qdir), "--threads", str(threads), "--tokens",
             str(tokens), "--prompt-len", str(PROMPT), "--json", str(js)],
            work / "logs" / f"bench-decode-{label}.log")
        ours[label] = json.loads(js.read_text())
    result = {"uptime_before": before, "uptime_after": uptime(), "llama_bench": llama,
              "lowbit_bench_decode": ours, "threads": threads, "tokens": tokens,
              "prompt": PROMPT}
    result["ratios"] = speed_ratios(result)
    return result


def speed_ratios(s: dict) -> dict[str, float]:
    """llama.cpp decode tokens/s over lowbit's: each DIR's GGUF over the DIR run by lowbit
    (bf16 activations), and the F32 base GGUF over lowbit's base in fp32 and bf16."""
    out = {}
    for label, rep in s["lowbit_bench_decode"].items():
        by = {(v["label"], v["dtype"]): v["decode_tokens_per_s"] for v in rep["variants"]}
        q = next(v for k, v in by.items() if k[0] == "quantized")
        out[f"{label}: llama.cpp / lowbit"] = s["llama_bench"][label]["tokens_per_s"] / q
        for dtype in ("fp32", "bf16"):
            out[f"base-f32 gguf / lowbit base {dtype}"] = (
                s["llama_bench"]["base-f32"]["tokens_per_s"] / by[("base", dtype)])
    return out


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--work", type=Path, help="working folder (default runs/gguf-bench/MODEL)")
    p.add_argument("--formats", default="Q4_K", help=f"comma list of {', '.join(FORMATS)}")
    p.add_argument("--methods", default="gptq,rtn", help="lowbit methods ('' = none)")
    p.add_argument("--lowbit-args", default="", help="extra `lowbit quantize` flags")
    p.add_argument("--base-source", choices=("lowbit", "gguf-source"), default="lowbit")
    p.add_argument("--embd-type", help="token embedding type when no lowbit export gives it")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=40, help="llama-perplexity chunks")
    p.add_argument("--agree-tokens", type=int, default=8192, help="0 skips the agreement check")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bench-tokens", type=int, default=128, help="0 skips the speed run")
    p.add_argument("--override-pre", help="load GGUFs with tokenizer.ggml.pre set to this "
                   "(llama-cpp-python path; e.g. smollm, the bundled source file's value)")
    p.add_argument("--json", type=Path, default=ROOT / "results" / "gguf" / "llamacpp.json")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.override_pre:
        OVERRIDE_PRE.extend(["--override-pre", args.override_pre])
    work = args.work or ROOT / "runs" / "gguf-bench" / args.model
    work.mkdir(parents=True, exist_ok=True)
    formats = [f.strip().upper() for f in args.formats.split(",") if f.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    result: dict = {"model": args.model, "uptime_start": uptime(), "ctx": args.ctx,
                    "override_pre": args.override_pre,
                    "chunks": args.chunks, "nsamples": args.nsamples, "seqlen": args.seqlen,
                    "threads": args.threads}
    result["texts"] = write_texts(work, args.model, args.nsamples, args.seqlen)
    calib, evalf = Path(result["texts"]["calib_file"]), Path(result["texts"]["eval_file"])
    base, result["base_source"] = base_gguf(work, args.model, args.base_source)
    ggufs: dict[str, Path] = {"base-f32": base}
    dirs: dict[str, Path] = {}
    for fmt in formats:
        for m in methods:
            dirs[f"lowbit-{m}-{fmt}"], ggufs[f"lowbit-{m}-{fmt}"] = lowbit_gguf(
                work, args.model, m, fmt, calib, args.nsamples, args.seqlen,
                args.lowbit_args.split())
    imat = imatrix(work, base, calib, args.nsamples, args.seqlen, args.threads)
    result["formats"] = {}
    for fmt in formats:
        ref = next((ggufs[k] for k in ggufs if k.startswith("lowbit-") and k.endswith(fmt)), None)
        ref_types = tensor_types(ref) if ref else {}
        embd = ref_types.get("token_embd.weight", {}).get("type") or args.embd_type or "F16"
        output = ref_types.get("output.weight", {}).get("type")
        for tag, im in (("rtn", None), ("imatrix", imat)):
            if tag == "rtn" or im:
                ggufs[f"llamacpp-{tag}-{fmt}"] = llama_quant(work, base, fmt, embd, output, im,
                                                             args.threads)
        result["formats"][fmt] = {"token_embd": embd, "output": output, "lowbit_reference":
                                  ref.name if ref else None, "type_mismatches": {
                                      k: type_mismatches(ref_types, tensor_types(p))
                                      for k, p in ggufs.items() if ref and k.endswith(fmt)}}
    result["engine"] = "llama.cpp tools" if have_tools() else "llama-cpp-python"
    if have_tools():
        logits, result["base_ppl_llamacpp"] = base_logits(work, base, evalf, args.ctx,
                                                          args.chunks, args.threads)
    else:
        npy = pp_windows(work, args.model, args.ctx, args.ctx * args.chunks)
    result["ggufs"] = {}
    for key, path in ggufs.items():
        row = bits_summary(tensor_types(path), path)
        if key != "base-f32" and have_tools():
            row.update(score(work, path, logits, args.ctx, args.chunks, args.threads))
        elif key != "base-f32":
            row.update(pyhelper(["score", str(path), str(npy), "--base", str(base), "--threads",
                                 str(args.threads)], work / "logs" / f"kld-py-{path.stem}.log"))
            result["base_ppl_llamacpp"] = row["ppl_base"]
        result["ggufs"][key] = {"file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT)
                                else str(path), **row}
    if args.agree_tokens:
        pairs = [("base-f32", args.model, base)] + [(k, str(dirs[k]), ggufs[k]) for k in dirs]
        result["agreement"] = agreement(work, pairs, args.seqlen, args.agree_tokens,
                                        args.threads)
    if args.bench_tokens and have_tools():
        speed_ggufs = {k: v for k, v in ggufs.items() if k == "base-f32" or k in dirs
                       or k.startswith("llamacpp-rtn-")}
        first = {k: v for k, v in dirs.items() if k.startswith(f"lowbit-{methods[0]}-")
                 } if methods else {}
        result["speed"] = speed(work, speed_ggufs, first, args.threads, args.bench_tokens)
    print_tables(result)
    write_json(args.json, result)


def print_tables(r: dict) -> None:
    how = ("llama-perplexity" if r["engine"] == "llama.cpp tools" else
           "llama-cpp-python logits on lowbit's windows")
    print(f"\n{r['model']}: {how}, austen-pp, ctx {r['ctx']}, {r['chunks']} chunks; "
          f"calibration {r['texts']['calib_tokens']} tokens of austen-emma; base: "
          f"{r['base_source']} (PPL {r['base_ppl_llamacpp']:.4f})")
    print(f"{'GGUF':<26}{'bpw file':>9}{'bpw lin':>9}{'mean KLD':>10}{'99% KLD':>9}"
          f"{'PPL':>9}{'same top':>9}  linear types")
    for k, g in r["ggufs"].items():
        kld = f"{g['kld_mean']:.5f}" if "kld_mean" in g else "-"
        k99 = f"{g['kld_99']:.4f}" if "kld_99" in g else "-"
        ppl = f"{g['ppl']:.4f}" if "ppl" in g else f"{r['base_ppl_llamacpp']:.4f}"
        top = f"{g['same_top_p']:.1f}%" if "same_top_p" in g else "-"
        types = ",".join(f"{t}x{n}" for t, n in sorted(g["linear_types"].items()))
        print(f"{k:<26}{g['bpw_file']:>9.3f}{g['bpw_linears']:>9.3f}{kld:>10}{k99:>9}{ppl:>9}"
              f"{top:>9}  {types}; embd {g['token_embd']}, output {g['output']}")
    for fmt, f in r["formats"].items():
        for k, mism in f["type_mismatches"].items():
            if mism:
                print(f"  {fmt} TYPE MISMATCH {k} vs {f['lowbit_reference']}: {mism[:5]}")
    if r.get("agreement"):
        print("\nlowbit eval vs llama.cpp (llama-cpp-python) on the same austen-pp windows")
        for a in r["agreement"]:
            print(f"  {a['label']:<24} {a['windows']} x {a['tokens'] // a['windows'] + 1} tok: "
                  f"lowbit {a['ppl_lowbit']:.4f}  llama.cpp {a['ppl_llamacpp']:.4f}  "
                  f"rel diff {a['ppl_rel_diff']:+.2e}")
    if r.get("speed"):
        s = r["speed"]
        print(f"\ndecode, {s['threads']} threads ({s['uptime_before']})")
        for k, v in s["llama_bench"].items():
            print(f"  llama-bench tg{s['tokens']} @ d{s['prompt']} {k:<24} "
                  f"{v['tokens_per_s']:8.1f} tok/s")
        for k, v in s["lowbit_bench_decode"].items():
            for var in v["variants"]:
                print(f"  lowbit bench decode {k} {var['label']} {var['dtype']}: "
                      f"{var['decode_tokens_per_s']:.1f} tok/s")
        for k, v in s["ratios"].items():
            print(f"  {k}: {v:.2f}x")
        print(f"  (after: {s['uptime_after']})")


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("models", {})[result["model"]] = result
    data["command"] = "python benchmarks/llamacpp/gguf_vs_llamacpp.py " + " ".join(sys.argv[1:])
    path.write_text(json.dumps(data, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
