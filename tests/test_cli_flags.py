"""``lowbit quantize``'s flags come from the method's config class alone (docs/CLI.md): type
from the type hint, help and choices from the field's metadata (``option(...)``), one parser
per method (``--method`` is found first), another method's flag the one-line error. None of
these tests loads a model: parsing and help end before anything is read.

Every config field must be an ``option(default, help, ...)``: its help metadata is the only
source of its flag's help (``test_every_field_has_a_flag_with_help``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest

from lowbit.algorithms import methods
from lowbit.cli import commands
from lowbit.cli.main import build_parser, main, quantize_parser
from lowbit.cli.method_flags import method_settings, settings_of
from lowbit.core import method as method_registry
from lowbit.core.config import MethodConfig, option
from lowbit.errors import LowbitError

METHODS = sorted(methods())


def _squash(text: str) -> str:
    """``text`` without whitespace: argparse wraps help lines (and breaks after hyphens)."""
    return "".join(text.split())


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["quantize", *argv, "--help"])
    out, err = capsys.readouterr()
    assert stop.value.code == 0, err
    return out


def _actions(method: str) -> dict[str, object]:
    """option string -> argparse action of ``lowbit quantize --method METHOD``."""
    return {s: a for a in quantize_parser(method)._actions for s in a.option_strings}


@pytest.mark.parametrize("method", METHODS)
def test_every_field_has_a_flag_with_help(method):
    """Every config field has a flag (its dest: ``cfg_<field>``, or the field name for the
    common ones) whose help is the field's non-empty ``help`` metadata (a field declared
    without :func:`~lowbit.core.config.option`, or redeclared in a subclass with a plain
    default, has none)."""
    config_cls = methods()[method].config_cls
    actions = _actions(method)
    settings = {s.name: s for s in settings_of(methods()[method])}
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    assert set(settings) == set(fields)
    no_help = [n for n, f in fields.items() if not str(f.metadata.get("help", "")).strip()]
    assert not no_help, f"{method} fields without help metadata (use option()): {no_help}"
    for name, s in settings.items():
        assert s.help == fields[name].metadata["help"]
        action = actions[s.flags[0]]
        assert action.dest in (f"cfg_{name}", name)
        assert _squash(s.help.replace("%", "%%")) in _squash(action.help)


def test_rank_is_an_int_for_qllm_and_lr_a_float_for_lrqat():
    args = build_parser().parse_args(
        ["quantize", "m", "--method", "qllm", "--out", "o", "--rank", "2", "--lr", "1e-3"]
    )
    assert args.cfg_rank == 2 and type(args.cfg_rank) is int
    assert method_settings(args, "qllm") == {"rank": 2, "lr": 1e-3}
    args = build_parser().parse_args(
        ["quantize", "m", "--method=lrqat", "--out", "o", "--lr", "2", "--rank", "8"]
    )
    assert type(args.cfg_lr) is float and args.cfg_lr == 2.0 and args.cfg_rank == 8
    assert args.command == "quantize" and args.func is commands.quantize


@pytest.mark.parametrize("method", METHODS)
def test_common_flags_for_every_method(method):
    """``--bits/--wbits``, ``-g/--group-size``, ``--sym/--asym`` (the contract) for every
    method, wherever their help comes from."""
    parser = build_parser()
    base = ["quantize", "m", "--method", method, "--out", "o"]
    args = parser.parse_args([*base, "--wbits", "3", "-g", "64", "--asym"])
    assert (args.bits, args.group_size, args.symmetric) == (3, 64, False)
    args = parser.parse_args([*base, "--bits", "5", "--group-size", "-1", "--sym"])
    assert (args.bits, args.group_size, args.symmetric) == (5, -1, True)
    args = parser.parse_args(base)
    assert (args.bits, args.group_size, args.symmetric) == (None, None, None)
    assert method_settings(args, method) == {}


@pytest.mark.parametrize("method", METHODS)
def test_method_help_lists_its_flags_with_help_type_default(capsys, method):
    out = _help(capsys, "--method", method)
    flat = _squash(out)
    own = set()
    for s in settings_of(methods()[method]):
        for flag in (*s.flags, *s.negatives):
            assert flag in out, f"{flag} missing from --method {method} --help"
            own.add(flag)
        assert _squash(s.describe()) in flat, f"{s.name}: {s.describe()}"
    for other in METHODS:  # no other method's settings
        for s in settings_of(methods()[other]):
            if s.flags[0] not in own:
                assert f" {s.flags[0]} " not in out, f"{s.flags[0]} in --method {method} --help"


def test_help_without_method_lists_every_method(capsys):
    out = _help(capsys)
    for name, m in methods().items():
        assert name in out and _squash(m.summary) in _squash(out)
    assert "lowbit quantize --method M --help" in out
    assert "--bits B, --wbits B" in out and "-g G, --group-size G" in out and "--asym" in out
    assert "--percdamp" not in out  # method settings only with --method


@pytest.mark.parametrize(
    "method,argv,flag",
    [
        ("rtn", ["--percdamp", "0.1"], "--percdamp"),
        ("rtn", ["--no-act-order"], "--no-act-order"),
        ("gptq", ["--rank=4"], "--rank"),
        ("qllm", ["--train-corpus", "brown"], "--train-corpus"),
    ],
)
def test_another_methods_flag_is_one_line_exit_2(capsys, method, argv, flag):
    code = main(["quantize", "m", "--method", method, *argv, "--out", "o"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"lowbit: error: {flag} does not apply to method '{method}'"), err


@pytest.mark.parametrize("argv", [["--out", "o"], ["--help"]])
def test_unknown_method_is_one_line_exit_2(capsys, argv):
    code = main(["quantize", "m", "--method", "magic", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "unknown method 'magic'" in err and all(name in err for name in METHODS)


@dataclass(frozen=True)
class _ProbeConfig(MethodConfig):
    """A method that exists only in these tests."""

    method = "zz-probe"
    bits: int = option(4, "weight bits of the probe", flag="--wbits")
    group_size: int = option(32, "probe groups")
    symmetric: bool = option(False, "probe grid")
    lr_warmup: float = option(0.5, "warm-up fraction, 100% = all steps")
    mode: str = option("fast", "how to probe", choices=("fast", "slow"), flag="--probe-mode")
    paths: tuple[str, ...] = option(("*.q",), "layer patterns")
    fused: bool = option(True, "fuse the probes")


@pytest.fixture
def probe(monkeypatch):
    """``_ProbeConfig`` registered for one test (the registry is restored after)."""
    monkeypatch.setitem(
        method_registry.METHODS, _ProbeConfig, method_registry.Method(_ProbeConfig, "a probe")
    )
    return _ProbeConfig.method


def test_metadata_help_is_the_flags_help(probe):
    """Where a field has ``option`` metadata, the flag's help, choices and alias are its (every
    method's fields that have it, and the probe's, which all do)."""
    seen = 0
    for name in sorted(methods()):
        for f, s in zip(
            dataclasses.fields(methods()[name].config_cls),
            settings_of(methods()[name]),
            strict=True,
        ):
            if "help" not in f.metadata:
                continue
            seen += 1
            assert s.help == f.metadata["help"] and s.help.strip(), f"{name}.{f.name}"
            assert s.choices == tuple(f.metadata.get("choices", ()))
            if f.metadata.get("flag"):
                assert f.metadata["flag"] in s.flags
    assert seen >= len(dataclasses.fields(_ProbeConfig))


def test_flags_from_metadata_alone(capsys, probe):
    """A config with metadata only (no docstring): flags by type, aliases, choices, help."""
    args = build_parser().parse_args(
        ["quantize", "m", "--method", probe, "--out", "o", "--lr-warmup", "0.25",
         "--probe-mode", "slow", "--paths", "*.k", "*.v", "--no-fused", "--wbits", "3"]
    )
    assert method_settings(args, probe) == {
        "lr_warmup": 0.25, "mode": "slow", "paths": ("*.k", "*.v"), "fused": False
    }
    assert args.bits == 3
    out = _help(capsys, "--method", probe)
    for text in ("warm-up fraction, 100% = all steps [float; default 0.5]",
                 "how to probe [str; default 'fast'; one of: fast, slow]",
                 "layer patterns [patterns; default *.q]", "fuse the probes [switch; default on]",
                 "weight bits of the probe [int; default 4]", "probe grid [default --asym]"):
        assert _squash(text) in _squash(out), text
    assert "--mode" in out and "--probe-mode" in out and "--fused, --no-fused" in out
    assert "--probe-mode MODE" in out and "{" not in out  # choices: in the help text


def test_a_prefix_of_own_flag_from_another_method_is_refused(capsys, probe):
    """``--lr`` (qllm, lrqat) is a prefix of the probe's ``--lr-warmup``: argparse alone would
    take it for that flag."""
    code = main(["quantize", "m", "--method", probe, "--lr", "0.1", "--out", "o"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"lowbit: error: --lr does not apply to method '{probe}'")


def test_recipe_then_flags(monkeypatch, tmp_path):
    """The recipe's keys, then the flags over them (the settings ``build_config`` gets)."""
    seen = {}

    def build_config(method, settings):
        seen.update(method=method, settings=settings)
        raise LowbitError("stop here")

    monkeypatch.setattr(commands.api, "build_config", build_config)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: gptq\nbits: 3\npercdamp: 0.05\nact_order: false\nignore: ['*.x']\n")
    code = main(["quantize", "m", "--method", "gptq", "--recipe", str(recipe), "--out",
                 str(tmp_path / "o"), "--percdamp", "0.02", "--wbits", "4", "-g", "64"])
    assert code == 2
    assert seen == {
        "method": "gptq",
        "settings": {"bits": 4, "percdamp": 0.02, "act_order": False, "ignore": ["*.x"],
                     "group_size": 64},
    }


def test_methods_command(capsys, tmp_path):
    code = main(["methods", "--json", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert code == 0
    rows = json.loads((tmp_path / "m.json").read_text())
    assert [r["name"] for r in rows] == METHODS
    for r in rows:
        m = methods()[r["name"]]
        assert r["summary"] == m.summary and r["name"] in out
        assert r["kind"] == ("block-wise" if m.apply_block else "whole-model")
        assert r["distributed"] is m.distributed
        assert [s["name"] for s in r["settings"]] == [
            f.name for f in dataclasses.fields(m.config_cls)
        ]
        assert all(s["help"] and s["flags"] for s in r["settings"])
    lrqat = next(r for r in rows if r["name"] == "lrqat")
    assert lrqat["kind"] == "whole-model" and "whole-model" in out
