"""One error type at the boundary (docs/DESIGN.md, "Layers"): a ValueError that a lower layer
raises for bad user input reaches the user as a LowbitError naming the option and the fix
(the CLI: one line ``lowbit: error: ...``, exit 2, nothing written); anything else (an internal
bug) stays a traceback."""

from __future__ import annotations

import pytest

from lowbit import api
from lowbit.cli.main import main
from lowbit.engine import distributed
from lowbit.errors import LowbitError, user_input
from lowbit.pipeline import quantizing

CALIB = api.CalibSpec(nsamples=2, seqlen=16, batch_size=2)
RTN = {"bits": 4, "group_size": 32}
QUANTIZE = ["--method", "rtn", "--bits", "4", "-g", "32", "--nsamples", "2", "--seqlen", "16"]


def _cli_error(argv, capsys) -> str:
    """The CLI's one error line (exit 2, nothing else on stderr but progress)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lowbit: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    print(f"\n{lines[0]}")
    return lines[0]


# ------------------------------------------------------------------ the converter itself
def test_user_input_names_the_option_and_the_fix():
    with pytest.raises(LowbitError) as info:
        with user_input("--act-format", "use int8 or fp8_e4m3"):
            raise ValueError("unknown number format 'fp9';\nknown: int8, fp8_e4m3")
    assert str(info.value) == (
        "--act-format: unknown number format 'fp9'; known: int8, fp8_e4m3; use int8 or fp8_e4m3"
    )
    assert isinstance(info.value.__cause__, ValueError)  # the lower layer's error, for -v


def test_user_input_as_a_decorator_without_a_fix():
    @user_input("--nsamples")
    def shard():
        raise ValueError("2 windows cannot be split over 4 processes; raise --nsamples")

    with pytest.raises(LowbitError, match=r"^--nsamples: 2 windows .*; raise --nsamples$"):
        shard()
    assert user_input("--x")(lambda: 7)() == 7  # no error: the value passes through


@pytest.mark.parametrize("bug", [TypeError("bug"), KeyError("bug"), RuntimeError("bug")])
def test_user_input_converts_nothing_but_value_errors(bug):
    with pytest.raises(type(bug)):
        with user_input("--act-format", "fix"):
            raise bug


# ------------------------------------------------------------------ the api
def test_a_lower_layers_value_error_reaches_the_api_as_a_lowbit_error(tiny_model, monkeypatch):
    """distributed.shard (engine) raises ValueError when the windows cannot be split over the
    processes; api.quantize names --nsamples."""
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 4))
    loaded = api.load_model(str(tiny_model))
    with pytest.raises(LowbitError) as info:
        api.quantize(loaded, api.build_config("rtn", RTN), CALIB, progress=False)
    message = str(info.value)
    assert message.startswith("--nsamples: 2 calibration windows cannot be split over 4 ")
    assert "raise --nsamples" in message  # the fix


def test_calibration_batch_size_is_checked_at_the_spec():
    """A zero batch size used to reach the engine's range() as a ValueError traceback."""
    for bad in (0, -2, 2.5, True):
        with pytest.raises(LowbitError, match="batch_size must be an integer >= 1"):
            api.CalibSpec(batch_size=bad)


def test_public_lookups_raise_lowbit_errors():
    """The algorithms lookups and the config builders: bad names are LowbitErrors."""
    from lowbit.algorithms import config_class, method_named

    for call in (
        lambda: config_class("gptqq"),
        lambda: method_named(""),
        lambda: api.build_config("rtn", {"bitz": 4}),
        lambda: api.as_config({"method": 4}),
        lambda: api.model_path("no/such/model"),
    ):
        with pytest.raises(LowbitError):
            call()


def test_an_internal_bug_in_the_api_stays_a_traceback(tiny_model, monkeypatch):
    """Not a blanket conversion: a ValueError raised outside the option's check (here: inside
    the block loop) and a non-ValueError inside it propagate unchanged."""
    loaded = api.load_model(str(tiny_model))

    def broken(*args, **kwargs):
        raise ValueError("internal: shapes disagree")

    monkeypatch.setattr(quantizing, "quantize_sequential", broken)
    with pytest.raises(ValueError, match="internal: shapes disagree"):
        api.quantize(loaded, api.build_config("rtn", RTN), CALIB, progress=False)

    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 2))

    def shard(ids):
        raise KeyError("internal: no such rank")

    monkeypatch.setattr(distributed, "shard", shard)
    with pytest.raises(KeyError):
        api.quantize(loaded, api.build_config("rtn", RTN), CALIB, progress=False)


# ------------------------------------------------------------------ the command line
def test_a_lower_layers_value_error_reaches_the_cli_as_one_line(
    tiny_model, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 4))
    out = tmp_path / "q"
    line = _cli_error(["quantize", str(tiny_model), *QUANTIZE, "--out", str(out)], capsys)
    assert line.startswith("lowbit: error: --nsamples: 2 calibration windows cannot be split")
    assert not out.exists() and not (tmp_path / "q.ckpt").exists()  # nothing half-written


def test_bench_settings_a_lower_layer_refuses_are_one_line(tiny_model, capsys):
    line = _cli_error(["bench", "decode", str(tiny_model), "--tokens", "1"], capsys)
    assert "--tokens, --prompt-len, --prefill-repeats: need tokens >= 2" in line
    line = _cli_error(
        ["bench", "decode", str(tiny_model), "--tokens", "2", "--prompt-len", "1000000",
         "--no-compile"],
        capsys,
    )
    assert line.startswith("lowbit: error: --prompt-len: corpus austen-pp gives only ")


def test_an_internal_bug_in_the_cli_stays_a_traceback(tiny_model, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("internal: shapes disagree")

    monkeypatch.setattr(quantizing, "quantize_sequential", broken)
    with pytest.raises(ValueError, match="internal: shapes disagree"):
        main(["quantize", str(tiny_model), *QUANTIZE, "--out", str(tmp_path / "q")])
