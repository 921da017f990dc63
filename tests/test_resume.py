"""Resume of block-wise (PTQ) runs: a run killed after a finished block continues from the
next block, and its output is byte for byte the uninterrupted run's (lowbit.json minus its
timing fields)."""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from lowbit import api
from lowbit.algorithms import method_named
from lowbit.core.method import METHODS
from lowbit.engine import resume
from lowbit.errors import LowbitError

ARGS = ["--method", "gptq", "--bits", "4", "-g", "64", "--nsamples", "4", "--seqlen", "32"]
CALIB = api.CalibSpec(nsamples=4, seqlen=32, batch_size=2)
# output_error: RTN then collects Hessians, so its checkpoints carry the calibration inputs
# and fingerprint the tokens (plain RTN runs no calibration forward)
RTN = {"bits": 4, "group_size": 64, "output_error": True}
TIMING = ("seconds", "manifest_sha256")  # the seal covers the timing fields too


def _cli(model, out, *extra, kill_after=None):
    """Start ``lowbit quantize`` in a subprocess with one thread (same as every other run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop(resume.KILL_AFTER_ENV, None)
    if kill_after is not None:
        env[resume.KILL_AFTER_ENV] = str(kill_after)
    argv = [sys.executable, "-m", "lowbit.cli.main", "quantize", str(model), *ARGS, *extra]
    argv += ["--out", str(out)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc):
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out.decode(errors="replace")


def _without_timing(manifest):
    """The manifest minus what differs between identical runs: wall-clock seconds (run and
    per layer) and the seal over them."""
    manifest = {k: copy.deepcopy(v) for k, v in manifest.items() if k not in TIMING}
    for layer in manifest["layers"].values():
        layer["metrics"].pop("seconds")
    return manifest


def test_sigkill_after_block_2_of_3_then_resume_is_byte_identical(smollm2_3blocks, tmp_path):
    """Two blocks restored from the killed run's checkpoint, the third computed on resume."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    ckpt = tmp_path / "cut.ckpt"
    procs = [_cli(smollm2_3blocks, full), _cli(smollm2_3blocks, cut, kill_after=2)]
    (code_full, log_full), (code_cut, _) = (_finish(p) for p in procs)
    assert code_full == 0, log_full
    assert code_cut == -9  # SIGKILL right after block 2's checkpoint was committed
    assert not cut.exists()  # no half-written output
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["finished"] == 1 and state["blocks"] == 3
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["block_0000.pt", "block_0001.pt", "inputs_0002.pt", "state.pt"]
    saved = json.loads(torch.load(ckpt / "block_0000.pt", weights_only=True)["reports"])

    code, log = _finish(_cli(smollm2_3blocks, cut, "--resume"))
    assert code == 0, log

    assert not ckpt.exists()  # finished: the checkpoint is gone
    assert sorted(p.name for p in full.iterdir()) == sorted(p.name for p in cut.iterdir())
    for path in full.iterdir():
        if path.name != "lowbit.json":
            assert path.read_bytes() == (cut / path.name).read_bytes(), path.name
    a = json.loads((full / "lowbit.json").read_text())
    b = json.loads((cut / "lowbit.json").read_text())
    assert json.dumps(_without_timing(a), sort_keys=True) == json.dumps(
        _without_timing(b), sort_keys=True
    )  # as text: a NaN metric equals itself
    # blocks 0-1 were restored, not recomputed: their reports are the killed run's
    restored = {r["name"]: r["seconds"] for r in saved}
    assert {n: b["layers"][n]["metrics"]["seconds"] for n in restored} == restored


def _refused(match: str, call, *args, **kwargs) -> str:
    """The LowbitError message of ``call`` (printed with ``-s``: docs/RELIABILITY.md)."""
    with pytest.raises(LowbitError, match=match) as info:
        call(*args, **kwargs)
    print(f"\n[{match}] {info.value}")
    return str(info.value)


class _Crash(Exception):
    """Stands for the process dying while it quantizes a block."""


def _crash_at_block(monkeypatch, method: str, index: int) -> None:
    registered = method_named(method)

    def apply_block(config, ctx):
        if ctx.index == index:
            raise _Crash
        return registered.apply_block(config, ctx)

    monkeypatch.setitem(METHODS, registered.config_cls, dataclasses.replace(registered,
        apply_block=apply_block))


def _run(path, work, settings=RTN, calib=CALIB, resume_=False):
    loaded = api.load_model(str(path))
    result = api.quantize(loaded, api.build_config("rtn", settings), calib, False, workdir=work,
        resume=resume_)
    return loaded, result


def test_resume_in_process_is_exact_and_refuses_other_settings(smollm2_2blocks, tmp_path):
    work = tmp_path / "q.ckpt"
    reference, expected = _run(smollm2_2blocks, None)
    with pytest.MonkeyPatch.context() as mp:
        _crash_at_block(mp, "rtn", 1)
        with pytest.raises(_Crash):
            _run(smollm2_2blocks, work)
    assert sorted(p.name for p in work.iterdir()) == ["block_0000.pt", "inputs_0001.pt", "state.pt"]

    _refused("holds the checkpoint of an earlier run; pass --resume", _run, smollm2_2blocks, work)
    _refused(
        r"other settings \(config.bits: 4 -> 3\)", _run, smollm2_2blocks, work, {**RTN, "bits": 3},
        resume_=True,
    )
    seed1 = dataclasses.replace(CALIB, seed=1)
    _refused(
        r"calibration.seed: 0 -> 1, calibration.tokens_sha", _run, smollm2_2blocks, work,
        calib=seed1, resume_=True,
    )
    block = work / "block_0000.pt"
    good = block.read_bytes()
    block.write_bytes(good[: len(good) // 2])
    _refused("block_0000.pt is missing or unreadable", _run, smollm2_2blocks, work, resume_=True)
    block.write_bytes(good)

    loaded, result = _run(smollm2_2blocks, work, resume_=True)
    assert [r.name for r in result.layers] == [r.name for r in expected.layers]
    for got, want in zip(result.layers, expected.layers, strict=True):
        assert dataclasses.replace(got, seconds=0) == dataclasses.replace(want, seconds=0)
    want_state = reference.model.state_dict()
    got_state = loaded.model.state_dict()
    assert sorted(got_state) == sorted(want_state)
    assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)


def test_resume_refuses_changed_model_weights(smollm2_2blocks, tmp_path, monkeypatch):
    work = tmp_path / "q.ckpt"
    with monkeypatch.context() as mp:
        _crash_at_block(mp, "rtn", 1)
        with pytest.raises(_Crash):
            _run(smollm2_2blocks, work)
    loaded = api.load_model(str(smollm2_2blocks))
    with torch.no_grad():
        loaded.model.model.norm.weight[0] += 1
    _refused(
        r"model.weights_sha256: '", api.quantize, loaded, api.build_config("rtn", RTN), CALIB,
        False, workdir=work, resume=True,
    )


def test_disk_full_while_checkpointing_keeps_earlier_blocks(smollm2_2blocks, tmp_path, monkeypatch):
    work = tmp_path / "q.ckpt"

    def no_space(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(resume.torch, "save", no_space)
    with pytest.raises(LowbitError) as info:
        _run(smollm2_2blocks, work)
    print(info.value)
    assert str(info.value) == (
        f"no space left on the device while writing {work}; the blocks checkpointed so far are "
        "kept for --resume; free some space or write to another folder"
    )
    assert list(work.iterdir()) == []  # the partial temporary file is gone


@pytest.mark.parametrize(
    "method,settings",
    [
        ("spqr", {"bits": 3, "group_size": 16}),  # outliers, bilevel statistics, permutation
        ("zqfp", {"act_format": "fp8_e4m3", "lorc_rank": 4, "group_size": 64}),  # add-ons
    ],
)
def test_resume_restores_every_stored_weight_kind(tiny_model, tmp_path, method, settings):
    """The checkpoint round trip of each stored kind (a random 2-block Llama of hidden 64:
    what is stored, not its accuracy, is under test)."""
    work = tmp_path / "q.ckpt"
    reference = api.load_model(str(tiny_model))
    api.quantize(reference, api.build_config(method, settings), CALIB, False)
    with pytest.MonkeyPatch.context() as mp:
        _crash_at_block(mp, method, 1)
        with pytest.raises(_Crash):
            api.quantize(api.load_model(str(tiny_model)), api.build_config(method, settings),
                CALIB, False, workdir=work)
    loaded = api.load_model(str(tiny_model))
    api.quantize(loaded, api.build_config(method, settings), CALIB, False, workdir=work,
        resume=True)
    want, got = reference.model.state_dict(), loaded.model.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
