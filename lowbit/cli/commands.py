"""One function per sub-command: parse-level args in, printed tables and JSON out."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from lowbit import api
from lowbit.algorithms import method_named
from lowbit.algorithms import methods as all_methods
from lowbit.cli.method_flags import method_settings, settings_of
from lowbit.cli.table import render
from lowbit.data.calibration import check_draw
from lowbit.engine import distributed
from lowbit.engine.resume import discard_checkpoints
from lowbit.errors import LowbitError
from lowbit.eval.windows import check_eval_window
from lowbit.models import bundled


def models(args: argparse.Namespace) -> int:
    for name in args.prepare or []:
        print(f"preparing {name} ...", file=sys.stderr)
        bundled.prepare(name)
    rows = [
        {
            "name": m.name,
            "prepared": bundled.is_prepared(m.name),
            "path": str(bundled.prepared_path(m.name)),
            "package": m.package,
            "description": m.description,
        }
        for m in bundled.BUNDLED.values()
    ]
    print(
        render(
            ["name", "prepared", "package", "description"],
            [
                [r["name"], "yes" if r["prepared"] else "no", r["package"], r["description"]]
                for r in rows
            ],
        )
    )
    print(
        f"\ncache: {bundled.lowbit_home()} (set LOWBIT_HOME to move it); "
        "any local HF causal-LM folder works as MODEL too"
    )
    _write_json(args.json, rows)
    return 0


def methods(args: argparse.Namespace) -> int:
    rows = [
        {
            "name": m.name,
            "summary": m.summary,
            "kind": "block-wise" if m.apply_block is not None else "whole-model",
            "distributed": m.distributed,
            "config": m.config_cls.__name__,
            "settings": [s.to_dict() for s in settings_of(m)],
        }
        for m in sorted(all_methods().values(), key=lambda m: m.name)
    ]
    print(
        render(
            ["method", "summary", "runs", "distributed", "settings"],
            [
                [r["name"], r["summary"], r["kind"], "yes" if r["distributed"] else "no",
                 len(r["settings"])]
                for r in rows
            ],
        )
    )
    print("\n`lowbit quantize --method M --help` lists M's settings (flags and recipe keys)")
    _write_json(args.json, rows)
    return 0


def _read_recipe(path: str | None, method: str) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"recipe file {path} not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise LowbitError(f"recipe {path} is not valid YAML: {exc}") from exc
    if isinstance(data, list):
        if len(data) != 1:
            raise LowbitError(f"recipe {path} lists {len(data)} stages; this version runs one")
        data = data[0]
    if not isinstance(data, dict):
        raise LowbitError(f"recipe {path} must be a mapping of settings (or a list of one)")
    data = dict(data)
    recipe_method = data.pop("method", method)
    if recipe_method != method:
        raise LowbitError(f"recipe {path} is for method '{recipe_method}', not '{method}'")
    data.pop("version", None)
    return data


def quantize(args: argparse.Namespace) -> int:
    from lowbit.export.lowbit_format import check_output_dir

    check_output_dir(args.out)
    _check_run_flags(args)
    method_named(args.method)
    settings = _read_recipe(args.recipe, args.method)
    for key in ("bits", "group_size", "symmetric"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    settings.update(method_settings(args, args.method))
    config = api.build_config(args.method, settings)
    calib = api.CalibSpec(
        args.calib, args.nsamples, args.seqlen, args.seed, all_experts=args.calib_all_experts
    )
    device = api.as_device(args.device)  # a device this machine lacks: before any loading
    main_process = not distributed.init_from_env() or distributed.is_main()
    estimate = _preflight(args, config, calib, main_process)
    loaded = api.load_model(args.model, args.dtype, stream=args.stream)
    workdir = Path(f"{Path(args.out)}.ckpt")  # resumable state: finished blocks, or training
    result = api.quantize(loaded, config, calib, progress=main_process,
                          workdir=workdir, resume=args.resume, device=device)
    if not main_process:
        return 0  # torchrun: rank 0 saves, evaluates and reports
    out = api.save_quantized(loaded, result, args.out)
    print(_layer_table(result.layers, per_block=not args.layers))
    experts = _expert_tokens(result.layers)
    if experts:
        print(experts)
    report = {
        "model": args.model,
        "method": args.method,
        "out": str(out),
        "config": config.to_dict(),
        "avg_bits": result.avg_bits,
        "seconds": result.seconds,
        "stream": args.stream,
        "device": str(device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "preflight": None if estimate is None else estimate.to_dict(),
        "layers": [r.to_dict() for r in result.layers],
        **result.extra,
    }
    if args.ppl or args.kld:
        if loaded.stream is not None:  # its blocks are on disk: evaluate what was saved
            loaded = api.load_model(str(out))
        scores = api.evaluate(
            loaded, args.ppl, args.kld, seqlen=args.eval_seqlen, max_tokens=args.max_tokens,
            device=device,
        )
        report.update(
            ppl=scores["ppl"],
            kld=scores["kld"],
            top1_agreement=scores.get("top1_agreement"),
            eval_tokens=scores["eval_tokens"],
            eval_seqlen=args.eval_seqlen,
        )
    report["peak_rss_mb"] = api.peak_rss_mb()
    print(
        f"\n{args.method}: {result.avg_bits:.3f} bits/weight over quantized linears, "
        f"{result.seconds:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MiB -> {out}"
    )
    for corpus, value in report.get("ppl", {}).items():
        print(f"ppl {corpus}: {value:.3f}")
    if report.get("kld") is not None:
        print(f"kld: {report['kld']:.4f}")
    _write_json(args.json, report)
    discard_checkpoints(workdir)  # the run is complete: its checkpoint is stale
    return 0


def _check_run_flags(args: argparse.Namespace) -> None:
    """Calibration and evaluation flags out of range, before anything is loaded (the library
    checks them too, but only once the model and the text are read)."""
    check_draw(args.nsamples, args.seqlen, args.seed, prefix="--")
    if args.ppl or args.kld:
        _check_eval_flags(args, "--eval-seqlen")


def _check_eval_flags(args: argparse.Namespace, seqlen_flag: str) -> None:
    check_eval_window(args.eval_seqlen, args.max_tokens, (seqlen_flag, "--max-tokens"))


def _preflight(args: argparse.Namespace, config, calib, main_process: bool):
    """Print the run's memory and disk estimate and refuse a run that cannot fit, before the
    model is loaded (stdout: stderr stays one line when the run fails); the estimate, or None
    when there is none."""
    estimate = api.preflight(args.model, config, calib, args.out, args.stream, args.dtype)
    if estimate is None or not main_process:
        return estimate
    print(estimate.describe(), flush=True)
    if not args.no_preflight:
        estimate.check()
    return estimate


def _layer_table(layers: list, per_block: bool) -> str:
    headers = ["layer", "bits/w", "weight err", "output err", "seconds"]
    if not per_block:
        return render(
            headers,
            [
                [r.name, r.bits_per_weight, r.weight_rel_err, r.hessian_rel_err, r.seconds]
                for r in layers
            ],
        )
    blocks: dict[str, list] = defaultdict(list)
    for r in layers:
        blocks[".".join(r.name.split(".")[:3])].append(r)
    rows = []
    for name, rs in blocks.items():
        n = len(rs)
        rows.append(
            [
                f"{name} ({n} linears)",
                sum(r.bits_per_weight for r in rs) / n,
                sum(r.weight_rel_err for r in rs) / n,
                sum(r.hessian_rel_err for r in rs) / n,
                sum(r.seconds for r in rs),
            ]
        )
    return render(headers, rows)


def _expert_tokens(layers: list) -> str:
    """Calibration tokens each expert saw, per block (mixture-of-experts models; '' else)."""
    per_block: dict[str, dict[str, int]] = defaultdict(dict)
    for r in layers:
        head, sep, rest = r.name.partition(".experts.")
        if sep and "calib_tokens" in r.extra:
            per_block[head][rest.split(".")[0]] = r.extra["calib_tokens"]
    rows = []
    for name, tokens in per_block.items():
        counts = sorted(tokens.values())
        rows.append([name, len(counts), counts[0], counts[len(counts) // 2], counts[-1],
                     sum(1 for c in counts if c == 0)])
    if not rows:
        return ""
    headers = ["experts", "count", "min tokens", "median", "max", "no tokens"]
    return "\ncalibration tokens per expert (--json: each expert's calib_tokens)\n" + render(
        headers, rows
    )


def evaluate(args: argparse.Namespace) -> int:
    from lowbit.cli import report as lm_eval_report

    _check_eval_flags(args, "--seqlen")
    tasks = lm_eval_report.prepare(args) if args.tasks else None
    ppl = args.ppl
    if tasks is not None and args.ppl is getattr(args, "ppl_default", None):
        ppl = []  # with --tasks, perplexity only for corpora named with --ppl
    device = api.as_device(args.device)
    loaded = api.load_model(args.model, args.dtype)
    base = api.load_model(args.base, loaded.dtype) if args.kld and args.base else None
    scores = api.evaluate(
        loaded, ppl, args.kld, base, args.eval_seqlen, args.max_tokens, device=device
    )
    manifest = loaded.manifest or {}
    result = {
        "model": args.model,
        "method": manifest.get("method", "none"),
        "avg_bits": manifest.get("avg_bits", 32.0 if manifest == {} else None),
        "ppl": scores["ppl"],
        "kld": scores["kld"],
        "top1_agreement": scores.get("top1_agreement"),
        "eval_tokens": scores["eval_tokens"],
        "seqlen": args.eval_seqlen,
        "seconds": scores["seconds"],
        "device": str(device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "peak_rss_mb": api.peak_rss_mb(),
    }
    rows = [
        [corpus, value, result["eval_tokens"][corpus]] for corpus, value in result["ppl"].items()
    ]
    if rows:
        print(render(["corpus", "ppl", "tokens"], rows))
    if result["kld"] is not None:
        print(
            f"kld (vs {loaded.source if not args.base else args.base}): {result['kld']:.5f}  "
            f"top-1 agreement: {result['top1_agreement']:.4f}"
        )
    if tasks is not None:
        result.update(lm_eval_report.run(args, tasks, loaded))
        result["seconds"] += result["lm_eval"]["seconds"]
        result["peak_rss_mb"] = api.peak_rss_mb()
    _write_json(args.json, result)
    return 0


def generate(args: argparse.Namespace) -> int:
    import torch

    from lowbit.infer.decode import DecodeConfig, greedy_generate
    from lowbit.infer.prepare import path_counts, prepare_model

    if args.max_new_tokens < 1:
        raise LowbitError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    device = api.as_device(args.device)
    loaded = api.load_model(args.model, dtype)
    paths = path_counts(prepare_model(loaded.model.to(device), dtype))
    config = DecodeConfig(args.max_new_tokens, compile=args.compile)
    text, run = greedy_generate(loaded.model, loaded.tokenizer, args.prompt, config)
    print(text)
    kernels = ", ".join(f"{n} {p}" for p, n in paths.items()) or "dense torch"
    print(
        f"[{args.dtype} on {device}, kernels: {kernels}; static KV cache"
        f"{', compiled decode step' if run.compiled else ''}] prefill "
        f"{run.prompt_len} tokens {run.prefill_seconds:.3f} s; {len(run.new_tokens)} new tokens, "
        f"decode {run.decode_tokens_per_second:.1f} tok/s",
        file=sys.stderr,
    )
    return 0


def _write_json(path: str | None, data: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))
