"""Hostile inputs: damaged checkpoints, bad weights, bad calibration text, solver failures,
unsupported models, a full disk. Each must be one LowbitError that names the cause and leave
no output behind. Run with ``-s`` to see every message (docs/RELIABILITY.md copies them)."""

from __future__ import annotations

import errno
import json
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lowbit import api
from lowbit.algorithms.gptq import inverse_hessian_cholesky
from lowbit.cli.main import main
from lowbit.engine.context import BlockContext
from lowbit.errors import LowbitError
from lowbit.export import integrity, lowbit_format
from lowbit.export.lowbit_format import MANIFEST, WEIGHTS, load_quantized

CALIB = api.CalibSpec(nsamples=2, seqlen=32, batch_size=2)
RTN = {"bits": 4, "group_size": 32}
QUANTIZE = ["--bits", "4", "-g", "32", "--nsamples", "2", "--seqlen", "32"]


@pytest.fixture(scope="module")
def tiny_dir(tiny_model, tmp_path_factory):
    """A lowbit DIR (RTN 4-bit) of the tiny model, never modified: tests work on copies."""
    loaded = api.load_model(str(tiny_model))
    result = api.quantize(loaded, api.build_config("rtn", RTN), CALIB, progress=False)
    return api.save_quantized(loaded, result, tmp_path_factory.mktemp("tinyq") / "q")


@pytest.fixture(scope="module")
def tiny_state(tiny_dir):
    return load_quantized(tiny_dir)[0].state_dict()


@pytest.fixture
def copy_dir(tiny_dir, tmp_path):
    return shutil.copytree(tiny_dir, tmp_path / "q")


def _error(call, *args, **kwargs) -> str:
    """The LowbitError message of ``call`` (printed, for the docs)."""
    with pytest.raises(LowbitError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    print(f"\n[{call.__name__}] {message}")
    assert "\n" not in message
    return message


def _cli_error(argv, capsys) -> str:
    """The one-line error of the CLI (exit code 2), printed for the docs."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lowbit: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    with capsys.disabled():
        print(f"\n[cli] {lines[0]}")
    return lines[0][len("lowbit: error: ") :]


def _reseal(folder) -> None:
    """Rewrite lowbit.json's file records and seal for the folder as it is now (a writer that
    produced a consistent but wrong folder)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for key in (integrity.FILES, integrity.SEAL):
        manifest.pop(key)
    (folder / MANIFEST).write_text(json.dumps(integrity.seal(manifest, folder, MANIFEST)))


def _unsealed(folder) -> None:
    """Drop the integrity records, as in a DIR written before they existed."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for key in (integrity.FILES, integrity.SEAL):
        manifest.pop(key)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _header_end(data: bytes) -> int:
    """Where a safetensors file's JSON header ends (an 8-byte length comes first)."""
    return 8 + struct.unpack("<Q", data[:8])[0]


# --- damaged checkpoints ------------------------------------------------------------------------


def test_truncated_weights_are_caught_by_size(copy_dir):
    weights = copy_dir / WEIGHTS
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    msg = _error(load_quantized, copy_dir, verify="size")
    assert msg == (
        f"{weights} has {size // 2} bytes but lowbit.json records {size}: it is truncated or was "
        "changed; copy the folder again or re-quantize"
    )


def test_flipped_weight_byte_is_caught_by_sha256(copy_dir):
    weights = copy_dir / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) - 100] ^= 0x01  # inside a tensor: the header still parses
    weights.write_bytes(bytes(data))
    msg = _error(load_quantized, copy_dir)
    assert msg == (
        f"{weights} does not match the sha256 recorded in lowbit.json: it is corrupt or was "
        "changed; copy the folder again or re-quantize"
    )


def test_safetensors_header_errors_become_lowbit_errors(copy_dir):
    weights = copy_dir / WEIGHTS
    good = weights.read_bytes()
    bad_json = bytearray(good)
    bad_json[8] = ord("x")  # the header's opening brace
    weights.write_bytes(bytes(bad_json))
    assert "cannot be read (Error while deserializing header" in _error(
        load_quantized, copy_dir, verify="size"
    )
    weights.write_bytes(struct.pack("<Q", 1 << 40) + good[8:])  # header length past the end
    assert "cannot be read (Error while deserializing header" in _error(
        load_quantized, copy_dir, verify="size"
    )
    _unsealed(copy_dir)  # an older DIR: no sizes to compare, the header cut reaches safetensors
    weights.write_bytes(good[: _header_end(good) // 2])
    msg = _error(load_quantized, copy_dir)
    assert msg.startswith(f"{weights} cannot be read (") and msg.endswith(
        "); the folder is damaged, re-quantize"
    )


def test_truncated_manifest(copy_dir):
    manifest = copy_dir / MANIFEST
    manifest.write_text(manifest.read_text()[:100])
    assert "lowbit.json is not valid JSON (" in _error(load_quantized, copy_dir)


def test_edited_manifest_breaks_its_seal(copy_dir):
    manifest = copy_dir / MANIFEST
    data = json.loads(manifest.read_text())
    layer = next(iter(data["layers"].values()))
    layer["weight"]["grid"]["bits"] = 3  # would reinterpret the codes
    manifest.write_text(json.dumps(data, indent=2))
    assert _error(load_quantized, copy_dir) == (
        f"{manifest} does not match its own checksum (manifest_sha256): it was edited or is "
        "corrupt; restore the folder from a good copy or re-quantize"
    )


def test_missing_file(copy_dir):
    (copy_dir / "tokenizer.json").unlink()
    assert _error(load_quantized, copy_dir) == (
        f"{copy_dir / 'tokenizer.json'} is missing (lowbit.json lists it); copy the whole folder "
        "again or re-quantize"
    )


def test_layer_listed_but_its_tensors_missing(copy_dir):
    tensors = load_file(copy_dir / WEIGHTS)
    name = "model.layers.1.mlp.down_proj"
    for key in [k for k in tensors if k.startswith(f"{name}.")]:
        del tensors[key]
    save_file(tensors, copy_dir / WEIGHTS, metadata={"format": "pt"})
    _reseal(copy_dir)
    assert _error(load_quantized, copy_dir) == (
        f"layer {name} is listed in lowbit.json but model.safetensors has no tensors for it; "
        "the folder is damaged, re-quantize"
    )


def test_layer_with_one_tensor_missing(copy_dir):
    tensors = load_file(copy_dir / WEIGHTS)
    del tensors["model.layers.0.self_attn.q_proj.scales"]
    save_file(tensors, copy_dir / WEIGHTS, metadata={"format": "pt"})
    _reseal(copy_dir)
    assert _error(load_quantized, copy_dir) == (
        "layer model.layers.0.self_attn.q_proj: tensor or field 'scales' is missing from "
        "model.safetensors or its lowbit.json entry; the folder is damaged, re-quantize"
    )


# --- fuzzing the reader -------------------------------------------------------------------------

POSITION = st.one_of(st.integers(0, 511), st.floats(0, 1, exclude_max=True))
FLIPS = st.lists(st.tuples(POSITION, st.integers(1, 255)), min_size=1, max_size=3)
MUTATION = st.one_of(
    st.tuples(st.just("flip"), FLIPS), st.tuples(st.just("cut"), POSITION)
)
FUZZ = settings(
    max_examples=60, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _mutate(data: bytes, mutation) -> bytes:
    def at(position) -> int:
        if isinstance(position, int):
            return min(position, len(data) - 1)
        return int(position * len(data))

    kind, arg = mutation
    if kind == "cut":
        return data[: at(arg)]
    out = bytearray(data)
    for position, mask in arg:
        out[at(position)] ^= mask
    return bytes(out)


def _loads_same_or_refuses(folder, reference, verify) -> None:
    try:
        model = load_quantized(folder, verify=verify)[0]
    except LowbitError:
        return
    state = model.state_dict()
    assert sorted(state) == sorted(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)


@FUZZ
@given(file_index=st.integers(0, 99), mutation=MUTATION)
def test_fuzz_any_file_flip_or_cut_is_refused(copy_dir, tiny_state, file_index, mutation):
    """Any byte flips or truncation of any file: a LowbitError, or (a change JSON does not see,
    e.g. whitespace) exactly the saved weights; never another exception."""
    files = sorted(p for p in copy_dir.iterdir() if p.is_file())
    path = files[file_index % len(files)]
    good = path.read_bytes()
    path.write_bytes(_mutate(good, mutation))
    try:
        _loads_same_or_refuses(copy_dir, tiny_state, "sha256")
    finally:
        path.write_bytes(good)


@FUZZ
@given(flips=FLIPS)
def test_fuzz_safetensors_header_without_hashes(copy_dir, tiny_state, flips):
    """Flips inside the safetensors header with only sizes checked: never an exception other
    than LowbitError (weights may differ: that is what skipping the hashes gives up)."""
    weights = copy_dir / WEIGHTS
    good = weights.read_bytes()
    end = _header_end(good)
    inside = [((p if isinstance(p, int) else int(p * end)) % end, m) for p, m in flips]
    weights.write_bytes(_mutate(good, ("flip", inside)))
    try:
        load_quantized(copy_dir, verify="size")
    except LowbitError:
        pass
    finally:
        weights.write_bytes(good)


# --- bad models and calibration -----------------------------------------------------------------


def test_nan_weights_are_refused_naming_the_first(tiny_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
        model.model.layers[0].self_attn.o_proj.weight[:2, 0] = float("nan")
    bad = tmp_path / "bad"
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(bad)
    out = tmp_path / "q"
    argv = ["quantize", str(bad), "--method", "rtn", *QUANTIZE, "--out", str(out)]
    msg = _cli_error(argv, capsys)
    assert msg == (
        "model weight model.layers.0.self_attn.o_proj.weight holds 2 NaN and 0 infinite values "
        "(of 4096); the model files are damaged or were converted with an overflow: re-create "
        "them from the original checkpoint before quantizing"
    )
    assert not out.exists() and not (tmp_path / "q.ckpt").exists()


def test_calibration_text_too_short_or_empty(tiny_model, tmp_path, capsys):
    short, empty = tmp_path / "short.txt", tmp_path / "empty.txt"
    short.write_text("It is a truth universally acknowledged.")
    empty.write_text("")
    out = tmp_path / "q"
    # GPTQ reads the calibration text (RTN draws none: its weights need no data)
    argv = ["quantize", str(tiny_model), "--method", "gptq", *QUANTIZE, "--out", str(out)]
    assert _cli_error([*argv, "--calib", str(short)], capsys) == (
        "calibration text too short: a window of seqlen=32 needs 32 text tokens but the text has "
        "7; use a longer corpus (--calib) or lower --seqlen to at most 7"
    )
    assert _cli_error([*argv, "--calib", str(empty)], capsys) == (
        f"corpus file '{empty}' is empty; give a file with text in it"
    )
    assert not out.exists() and not (tmp_path / "q.ckpt").exists()


def test_indefinite_hessian_names_the_layer(tiny_model, tmp_path, capsys, monkeypatch):
    collect = BlockContext.collect_hessians

    def negated_k_proj(self, names):  # an indefinite Hessian for block 1's k_proj
        hessians = collect(self, names)
        key = "self_attn.k_proj"
        if self.index == 1 and key in hessians:
            hessians[key] = -hessians[key]
        return hessians

    monkeypatch.setattr(BlockContext, "collect_hessians", negated_k_proj)
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_model), "--method", "gptq", *QUANTIZE, "--out", str(out)]
    assert _cli_error(argv, capsys) == (
        "layer model.layers.1.self_attn.k_proj: the Hessian stayed indefinite after damping "
        "escalation (percdamp 0.01 raised x10 6 times); raise --percdamp or calibrate with more "
        "samples (--nsamples)"
    )
    assert not out.exists()


def test_non_finite_hessian():
    h = torch.eye(4)
    h[1, 2] = float("nan")
    assert _error(inverse_hessian_cholesky, h, 0.01).startswith("the Hessian holds NaN")


def test_gpt2_group_that_does_not_divide_its_width(tmp_path, capsys):
    """GPT-2 (Conv1D, found by discovery since #19) reaches the up-front shape check: a group
    size that divides no width is the one-line error, before any calibration or output."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        path
    )
    out = tmp_path / "q"
    msg = _cli_error(["quantize", str(path), "--method", "rtn", "--out", str(out)], capsys)
    assert msg.startswith(
        "group size 128 does not divide the input width 32 of transformer.h.0.attn.c_attn"
    )
    assert not out.exists()


# --- a full disk --------------------------------------------------------------------------------


def test_disk_full_while_saving_leaves_earlier_output(tiny_model, tiny_dir, tmp_path, monkeypatch):
    out = shutil.copytree(tiny_dir, tmp_path / "q")  # an earlier output of the same name
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    loaded = api.load_model(str(tiny_model))
    result = api.quantize(loaded, api.build_config("rtn", {**RTN, "bits": 3}), CALIB,
        progress=False)

    def no_space(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lowbit_format, "save_file", no_space)
    assert _error(api.save_quantized, loaded, result, out) == (
        f"no space left on the device while writing {out}; the partial folder was removed and "
        "an earlier output there is unchanged; free some space or write to another folder"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary folder left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
