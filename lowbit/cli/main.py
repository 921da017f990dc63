"""``lowbit`` command line (the contract in docs/CLI.md)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from lowbit.errors import LowbitError


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that can hand the parse to a method's parser: ``lowbit quantize``
    parses in two stages, ``--method`` first (:func:`~lowbit.cli.method_flags.find_method`),
    then with :func:`quantize_parser` of that method (``by_method``). A method's parser
    (``method``) refuses another method's flags with the one-line error."""

    def __init__(self, *args, by_method=None, method: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.by_method = by_method
        self.method = method

    def parse_known_args(self, args=None, namespace=None):
        from lowbit.cli.method_flags import check_flags, find_method

        args = sys.argv[1:] if args is None else list(args)
        if self.by_method is not None:
            method = find_method(args)
            if method is not None:
                return self.by_method(method, self.prog).parse_known_args(args, namespace)
        if self.method is not None:
            check_flags(args, self.method)
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    from lowbit.cli import commands
    from lowbit.cli.method_flags import methods_listing
    from lowbit.cli.report import add_compare_flags, add_task_flags, compare

    parser = _Parser(prog="lowbit", description="Low-bit quantization of causal LMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list bundled models and whether they are prepared")
    p.add_argument("--prepare", nargs="*", metavar="NAME", help="prepare these models now")
    p.add_argument("--json", metavar="FILE", help="write the list as JSON")
    p.set_defaults(func=commands.models)

    p = sub.add_parser("methods", help="list the quantization methods")
    p.add_argument("--json", metavar="FILE", help="write the methods and their settings as JSON")
    p.set_defaults(func=commands.methods)

    p = sub.add_parser(
        "quantize",
        help="quantize a model and save it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Quantize MODEL with method M and save it to DIR. Methods:\n"
        f"{methods_listing()}\n\n"
        "`lowbit quantize --method M --help` shows M's settings (each a flag and a recipe\n"
        "key); `lowbit methods` lists the methods.",
        by_method=quantize_parser,
    )
    _add_quantize_flags(p, None)

    p = sub.add_parser("eval", help="perplexity, KL divergence and lm-eval tasks of a model")
    p.add_argument("model", help="bundled name, local HF folder or lowbit DIR")
    eval_ppl_default = ["austen-pp"]
    _add_eval_flags(p, default_ppl=eval_ppl_default, seqlen_flags=("--seqlen", "--eval-seqlen"))
    p.add_argument("--base", help="model to measure KLD against (default: the DIR's source)")
    add_task_flags(p)
    add_device_flag(p, "where the model (and the --kld base) run, moved whole")
    add_dtype_flag(p)
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
    add_device_flag(p, "where the model runs, moved whole")
    p.add_argument("--compile", action="store_true", help="compile the decode step first")
    p.set_defaults(func=commands.generate)

    from lowbit.cli import export_cmd

    export_cmd.add_parser(sub)
    from lowbit.cli.bench_cmd import add_bench_parser

    add_bench_parser(sub)
    return parser


def add_device_flag(p: argparse.ArgumentParser, what: str) -> None:
    """``--device auto|cpu|cuda|cuda:N`` (default auto: CUDA when available)."""
    p.add_argument(
        "--device",
        default="auto",
        metavar="D",
        help=f"auto (default: cuda when available, else cpu), cpu, cuda or cuda:N: {what}",
    )


def add_dtype_flag(p: argparse.ArgumentParser) -> None:
    """``--dtype auto|float32|bfloat16|float16`` (default auto: the checkpoint's)."""
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        metavar="T",
        help="forward dtype: auto (default: the checkpoint's, config.json's dtype; a lowbit "
        "DIR: the dtype it was quantized in), float32, bfloat16 or float16",
    )


def quantize_parser(method: str, prog: str = "lowbit quantize") -> argparse.ArgumentParser:
    """``lowbit quantize``'s parser with ``method``'s flags (the second stage of its parse)."""
    from lowbit.algorithms import method_named

    summary = method_named(method).summary
    p = _Parser(
        prog=prog,
        method=method,
        description=f"Quantize MODEL with {method} ({summary}) and save it to DIR. Method "
        "settings override the --recipe file's keys.",
    )
    _add_quantize_flags(p, method)
    return p


def _add_quantize_flags(p: argparse.ArgumentParser, method: str | None) -> None:
    """Every flag of ``lowbit quantize``; ``method``'s settings when it is given."""
    from lowbit.algorithms import methods
    from lowbit.cli import commands
    from lowbit.cli.method_flags import add_method_flags

    p.add_argument("model", help="bundled name or local HF folder")
    p.add_argument(
        "--method",
        required=True,
        metavar="M",
        help=f"one of: {', '.join(sorted(methods()))} (`--method M --help`: M's settings)",
    )
    add_method_flags(p, method)  # the common flags here, the method's settings in their group
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
    add_device_flag(
        p, "each block moves there for its calibration and solve, the model stays in CPU "
        "memory (or on disk with --stream)"
    )
    add_dtype_flag(p)
    p.add_argument(
        "--no-preflight",
        action="store_true",
        help="print the memory and disk estimate but run even when it does not fit",
    )
    _add_eval_flags(p, default_ppl=[], seqlen_flags=("--eval-seqlen",))
    p.set_defaults(func=commands.quantize)


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
    p.add_argument(
        "--calib-all-experts",
        action="store_true",
        help="mixture-of-experts models: calibrate every expert on every token, not only on "
        "the tokens routed to it (outputs still follow the routing)",
    )


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
    try:
        args = parser.parse_args(argv)  # an unknown method, another method's flag: one line
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
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
