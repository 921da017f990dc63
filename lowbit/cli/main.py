"""``lowbit`` command line (the contract in docs/CLI.md)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from lowbit.errors import LowbitError


def build_parser() -> argparse.ArgumentParser:
    from lowbit.algorithms import methods
    from lowbit.cli import commands
    from lowbit.cli.method_flags import add_method_flags
    from lowbit.cli.report import add_compare_flags, add_task_flags, compare

    parser = argparse.ArgumentParser(
        prog="lowbit", description="Low-bit quantization of causal LMs"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list bundled models and whether they are prepared")
    p.add_argument("--prepare", nargs="*", metavar="NAME", help="prepare these models now")
    p.add_argument("--json", metavar="FILE", help="write the list as JSON")
    p.set_defaults(func=commands.models)

    p = sub.add_parser("quantize", help="quantize a model and save it")
    p.add_argument("model", help="bundled name or local HF folder")
    p.add_argument("--method", required=True, help=f"one of: {', '.join(sorted(methods()))}")
    p.add_argument("--bits", "--wbits", dest="bits", type=int, help="weight bits (2-8)")
    p.add_argument(
        "-g", "--group-size", type=int, help="columns per group; -1 = per output channel"
    )
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_const", const=True, default=None)
    sym.add_argument("--asym", dest="symmetric", action="store_const", const=False)
    p.add_argument("--recipe", metavar="FILE.yaml", help="method settings file; flags override it")
    _add_calib_flags(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--json", metavar="FILE", help="write the run report as JSON")
    p.add_argument("--layers", action="store_true", help="print every layer, not per block")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its checkpoint in OUT.ckpt (finished blocks, "
        "or training steps; start if none)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="never hold the full-precision model: read each block's weights from the "
        "safetensors files just before quantizing it, keep quantized blocks in OUT.ckpt until "
        "the output is written (block-wise methods)",
    )
    p.add_argument(
        "--no-preflight",
        action="store_true",
        help="print the memory and disk estimate but run even when it does not fit",
    )
    _add_eval_flags(p, default_ppl=[], seqlen_flags=("--eval-seqlen",))
    add_method_flags(p)
    p.set_defaults(func=commands.quantize)

    p = sub.add_parser("eval", help="perplexity, KL divergence and lm-eval tasks of a model")
    p.add_argument("model", help="bundled name, local HF folder or lowbit DIR")
    eval_ppl_default = ["austen-pp"]
    _add_eval_flags(p, default_ppl=eval_ppl_default, seqlen_flags=("--seqlen", "--eval-seqlen"))
    p.add_argument("--base", help="model to measure KLD against (default: the DIR's source)")
    add_task_flags(p)
    p.add_argument("--json", metavar="FILE", help="write results as JSON")
    p.set_defaults(func=commands.evaluate, ppl_default=eval_ppl_default)

    p = sub.add_parser("compare", help="table and plots across `eval`/`quantize` JSON results")
    add_compare_flags(p)
    p.set_defaults(func=compare)

    p = sub.add_parser("generate", help="greedy text generation")
    p.add_argument("model", help="bundled name, local HF folder or lowbit DIR")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="activation dtype (default bf16: the fast int4/int8 kernels)")
    p.add_argument("--compile", action="store_true", help="compile the decode step first")
    p.set_defaults(func=commands.generate)

    from lowbit.cli import export_cmd

    export_cmd.add_parser(sub)
    from lowbit.cli.bench_cmd import add_bench_parser

    add_bench_parser(sub)
    return parser


def _add_calib_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib",
        default="austen-emma",
        metavar="CORPUS",
        help="calibration corpus (bundled name or text file; default austen-emma)",
    )
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")


def _add_eval_flags(
    p: argparse.ArgumentParser, default_ppl: list[str], seqlen_flags: tuple[str, ...]
) -> None:
    """``seqlen_flags``: the evaluation window's flags (``eval``: ``--seqlen``, with
    ``--eval-seqlen`` as an alias; ``quantize``, whose ``--seqlen`` is the calibration
    window: ``--eval-seqlen``)."""
    p.add_argument(
        "--ppl",
        nargs="*",
        default=default_ppl,
        metavar="CORPUS",
        help=f"perplexity corpora (default: {' '.join(default_ppl) or 'none'})",
    )
    p.add_argument("--kld", action="store_true", help="KL divergence to the base model")
    p.add_argument(
        *seqlen_flags,
        dest="eval_seqlen",
        type=int,
        default=512,
        metavar="L",
        help="evaluation window in tokens (default 512)",
    )
    p.add_argument("--max-tokens", type=int, help="cap on evaluation tokens per corpus")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    _quiet_transformers()
    try:
        return args.func(args) or 0
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        message = _out_of_memory(exc)
        if message is None:
            raise
        print(f"lowbit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


def _out_of_memory(exc: BaseException) -> str | None:
    """The one-line error for a failed allocation (a setting sized the run beyond this
    machine: ``--batch-size 1000000``), or None for any other error (a bug: traceback)."""
    text = str(exc)
    oom = isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
    if not (oom or "can't allocate memory" in text):
        return None
    tried = re.search(r"tried to allocate (\d+) bytes", text)
    size = f" (an allocation of {int(tried.group(1)) / 2**30:.1f} GiB failed)" if tried else ""
    return (
        f"out of memory{size}; lower the settings that size the run (--nsamples, --seqlen, "
        "--batch-size, --train-seqlen, --group-blocks, ...), add --stream, or free memory"
    )


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
