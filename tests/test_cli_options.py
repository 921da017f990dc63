"""Every method option with out-of-range values through the CLI: exit code 2, one line
``lowbit: error: ...`` on stderr naming the option or the value, no traceback, nothing written
(docs/CLI.md). The options are enumerated from the method configs, the way
``lowbit.cli.method_flags`` builds the flags, so a new option is walked automatically, and
``test_every_option_has_out_of_range_cases`` fails until it has cases here (or a reasoned entry
in ``NO_BAD_VALUE``).

Every case fails before calibration: most in the config's validation (before the model is
loaded), shape-dependent ones (a group size or a rank the layers rule out) right after loading,
LR-QAT's training-data ones when its windows are drawn (before any training).
"""

from __future__ import annotations

import dataclasses
import functools
import typing

import pytest

from lowbit.algorithms import methods
from lowbit.cli.main import build_parser, main, quantize_parser

BIG = 10**6  # a group size, rank, batch or window no layer or machine allows
NAN, INF = "nan", "inf"

# option -> values out of range for every method that has the option. The test model
# (SmolLM2 cut to 2 blocks) has linears of 576 x 576, 192 x 576 (k/v), 1536 x 576 and
# 576 x 1536: 193 is one above the smallest side, the largest rank any layer allows.
BAD: dict[str, list] = {
    "bits": [1, 99, 0, -1],
    "group_size": [0, 1, -2, BIG],
    "percdamp": [0, -1, 11, NAN, INF],
    "block_size": [0, -1],
    "beta2": [0, -1],
    "qq_scale_bits": [0, 9, 99],
    "qq_zero_bits": [0, 9, -1],
    "outlier_threshold": [0, -1, NAN],
    "abits": [1, 9, 99, -1],
    "search_windows": [0, -1],
    "sample_tokens": [0, -1],
    "smooth_alpha": [-0.1, 1.5, NAN],
    "channel_ratio": [-0.1, 1.5, NAN],
    "search_steps": [0, -1],
    "group_blocks": [0, -1],
    "epochs": [0, -1],
    "micro_batch": [0, -1],
    "rank": [0, -1, 193, BIG],
    "alpha": [0, -1, NAN, INF],
    "lr": [-1, NAN, INF],
    "lorc_rank": [-1, 193, BIG],
    "weight_format": ["bogus", "uint4"],
    "act_format": ["bogus", "e8m0"],
    "act_granularity": ["bogus"],
    "scale_constraint": ["bogus"],
    "pair_score": ["bogus"],
    "phi": ["bogus"],
    "init": ["bogus"],
    "lp_norm": [0, -1, NAN, INF],
    "max_shrink": [-0.1, 1, 1.5, NAN],
    "grid_points": [0, -1],
    "lp_candidates": [0, -1],
    "steps": [-1],
    "scale_lr": [-1, NAN, INF],
    "weight_lr": [-1, NAN, INF],
    "warmup_ratio": [-0.1, 1.5, NAN],
    "adam_beta2": [-0.1, 1, NAN],
    "weight_decay": [-1, NAN, INF],
    "max_grad_norm": [-1, NAN],
    "batch_size": [0, -1, BIG],
    "train_seqlen": [1, 0, -1, BIG],
    "train_seed": [2**64, -(2**63) - 1],
    "checkpoint_every": [-1],
    "train_dtype": ["bogus"],
    "train_corpus": ["no-such-corpus"],
}

# (method, option) -> extra out-of-range argv for that method only (a value that another
# method with the same option accepts, or a switch one method refuses).
METHOD_BAD: dict[tuple[str, str], list[list[str]]] = {
    ("qllm", "lr"): [["--lr", "0"]],  # LR-QAT accepts lr 0 (frozen low-rank matrices)
    ("spqr", "symmetric"): [["--sym"]],  # SpQR statistics are asymmetric
    ("lrqat", "symmetric"): [["--asym"]],  # LR-QAT trains a signed symmetric grid
    ("zqfp", "symmetric"): [["--asym"]],  # FP weight formats are symmetric
}

# (method, option, value) in BAD that this method accepts, with the reason.
VALID_HERE = {
    ("zqfp", "bits", 0): "0 = the width of --weight-format",
}

# Options with no out-of-range value on their own, with the reason. Switches (bool fields)
# are in this set by their type: --x and --no-x are both valid settings wherever the method
# has them (combinations are the methods' own tests).
NO_BAD_VALUE = {
    "ignore": "glob patterns of layer names; any list is valid (one matching no layer leaves "
    "every layer quantized)",
}

# A group size dividing every width of the test model: the methods whose default (128) does
# not (gptq, rtn, zqfp) get a valid baseline, and a case's own --group-size overrides it.
# Tiny calibration: a case that slipped through validation would still finish (and fail).
BASE = ["-g", "64", "--nsamples", "1", "--seqlen", "16"]


def _options() -> list[tuple[str, str, typing.Any]]:
    """(method, field, type) for every field of every method's config."""
    out = []
    for method in sorted(methods().values(), key=lambda m: m.name):
        hints = typing.get_type_hints(method.config_cls)
        out += [(method.name, f.name, hints[f.name]) for f in dataclasses.fields(method.config_cls)]
    return out


@functools.cache
def _flags(method: str) -> dict[str, list[str]]:
    """dest -> option strings of ``lowbit quantize --method METHOD`` (its parser is built for
    the method named: method settings are ``cfg_<field>``, the common ones ``bits``,
    ``group_size``, ``symmetric``)."""
    flags: dict[str, list[str]] = {}
    for action in quantize_parser(method)._actions:
        flags.setdefault(action.dest, []).extend(action.option_strings)
    return flags


def _flag(method: str, name: str) -> str:
    flags = _flags(method)
    strings = flags.get(f"cfg_{name}") or flags.get(name) or []
    return next(s for s in strings if s.startswith("--"))


def _cases() -> list[tuple[str, str, list[str]]]:
    """(method, field, argv fragment) for every out-of-range case."""
    cases = []
    for method, name, _kind in _options():
        values = [v for v in BAD.get(name, []) if (method, name, v) not in VALID_HERE]
        cases += [(method, name, [_flag(method, name), str(v)]) for v in values]
        cases += [(method, name, argv) for argv in METHOD_BAD.get((method, name), [])]
    return cases


CASES = _cases()


def test_every_option_has_out_of_range_cases():
    missing, no_flag = [], []
    for method, name, kind in _options():
        flags = _flags(method)
        if f"cfg_{name}" not in flags and name not in flags:
            no_flag.append(f"{method}.{name}")
        if kind is bool or name in NO_BAD_VALUE:
            continue
        if not BAD.get(name) and not METHOD_BAD.get((method, name)):
            missing.append(f"{method}.{name}")
    assert not no_flag, f"config fields without a quantize flag: {no_flag}"
    assert not missing, (
        f"options without out-of-range cases: {missing}; add values to BAD (or METHOD_BAD), "
        "or a reasoned entry to NO_BAD_VALUE"
    )
    known = {name for _, name, _ in _options()}
    stale = sorted(set(BAD) - known | set(NO_BAD_VALUE) - known)
    stale += [f"{m}.{n}" for m, n in METHOD_BAD if (m, n) not in {(a, b) for a, b, _ in _options()}]
    assert not stale, f"cases for options that no method has: {stale}"


@pytest.mark.parametrize(
    "method,name,argv", CASES, ids=[f"{m}-{' '.join(a)}" for m, _, a in CASES]
)
def test_out_of_range_is_one_line_exit_2(capsys, tmp_path, smollm2_2blocks, method, name, argv):
    out = tmp_path / "o"
    code = main(["quantize", str(smollm2_2blocks), "--method", method, *BASE, *argv,
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("lowbit: error: ") and err.count("\n") == 1, err
    value = argv[-1]
    names = (name, name.replace("_", " "), _flag(method, name), value)
    assert any(n in err for n in names), f"the error names neither {name} nor {value}: {err}"
    assert not out.exists() and not (tmp_path / "o.ckpt").exists()


def test_eval_seqlen_flag_and_alias():
    """``eval --seqlen L`` is the evaluation window (``--eval-seqlen`` an alias); in
    ``quantize`` ``--seqlen`` stays the calibration window and ``--eval-seqlen`` its
    evaluation's."""
    parser = build_parser()
    for flag in ("--seqlen", "--eval-seqlen"):
        assert parser.parse_args(["eval", "m", flag, "64"]).eval_seqlen == 64
    assert parser.parse_args(["eval", "m"]).eval_seqlen == 512
    args = parser.parse_args(["quantize", "m", "--method", "rtn", "--out", "o", "--seqlen", "64",
                              "--eval-seqlen", "128"])
    assert (args.seqlen, args.eval_seqlen) == (64, 128)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["eval", "{model}", "--seqlen", "1"], "--seqlen must be at least 2"),
        (["eval", "{model}", "--eval-seqlen", "0"], "--seqlen must be at least 2"),
        (["eval", "{model}", "--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["quantize", "{model}", "--method", "rtn", "--nsamples", "0"], "--nsamples must be"),
        (["quantize", "{model}", "--method", "rtn", "--seqlen", "-1"], "--seqlen must be"),
        (["quantize", "{model}", "--method", "rtn", "--seed", str(2**64)], "--seed must be"),
        (["quantize", "{model}", "--method", "rtn", "--ppl", "austen-pp", "--eval-seqlen", "1"],
         "--eval-seqlen must be at least 2"),
    ],
)
def test_run_flags_out_of_range(capsys, tmp_path, smollm2_2blocks, argv, needle):
    """Calibration and evaluation flags out of range: the one-line error, before loading."""
    argv = [a.format(model=smollm2_2blocks) for a in argv]
    if argv[0] == "quantize":
        argv += ["--out", str(tmp_path / "o")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lowbit: error: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
