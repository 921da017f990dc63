"""Streaming quantization (--stream): blocks read lazily from the safetensors files, quantized
blocks kept on disk until the output is written. The output is byte for byte the normal run's;
resumes work across both modes; the pre-flight estimate refuses runs that cannot fit."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowbit import api
from lowbit.algorithms import method_named
from lowbit.cli.main import main
from lowbit.core.method import METHODS
from lowbit.engine import preflight
from lowbit.engine.resume import tensor_sha256
from lowbit.errors import LowbitError
from lowbit.export.safetensors_stream import StreamedSafetensors

CALIB = api.CalibSpec(nsamples=4, seqlen=32, batch_size=2)
RTN = {"bits": 4, "group_size": 64}
TIMING = ("seconds", "manifest_sha256")
STEADY_NOT = ("seconds", "rss_mb")  # per-layer extras that differ between identical runs

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantize(path, out, method="rtn", settings=RTN, stream=False, resume=False):
    loaded = api.load_model(str(path), stream=stream)
    work = out.parent / f"{out.name}.ckpt"
    result = api.quantize(loaded, api.build_config(method, settings), CALIB, False, workdir=work,
        resume=resume)
    api.save_quantized(loaded, result, out)
    return result


def _assert_same_output(a, b):
    """Two DIRs hold the same files, byte for byte, but lowbit.json's timing fields."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for path in a.iterdir():
        if path.name != "lowbit.json":
            assert path.read_bytes() == (b / path.name).read_bytes(), path.name
    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(
        str(b / "model.safetensors"), "pt"
    ) as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())  # noqa: SIM118
    ma, mb = (_without_timing(json.loads((d / "lowbit.json").read_text())) for d in (a, b))
    assert ma == mb


def _without_timing(manifest):
    """What differs between two identical runs left out: seconds, memory measured, the seal."""
    manifest = {k: v for k, v in manifest.items() if k not in TIMING}
    for layer in manifest["layers"].values():
        layer["metrics"] = _steady(layer["metrics"])
    return manifest


def _steady(metrics):
    """Layer metrics without wall times or measured memory (QLLM records its peak RSS)."""
    extra = {k: v for k, v in metrics.get("extra", {}).items() if not k.endswith(STEADY_NOT)}
    return {**{k: v for k, v in metrics.items() if k != "seconds"}, "extra": extra}


def test_writer_is_byte_identical_to_save_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64, torch.uint8,
              torch.int8, torch.int16, torch.bool, torch.float8_e4m3fn, torch.float64]
    tensors = {}
    for i in range(60):
        shape = tuple(rng.randint(0, 6) for _ in range(rng.randint(0, 3)))
        values = torch.randn(shape, generator=gen) * 3
        tensors[f"m.{rng.randint(0, 30)}.t{i}"] = values.to(dtypes[i % len(dtypes)])
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    items = list(tensors.items())
    rng.shuffle(items)
    parts = [dict(items[:25]), dict(items[25:])]
    writer = StreamedSafetensors({"format": "pt"})
    for part in parts:
        writer.add(part)
    writer.open(tmp_path / "streamed.safetensors")
    for part in reversed(parts):
        writer.write(part)
    writer.close()
    assert (tmp_path / "streamed.safetensors").read_bytes() == (
        tmp_path / "ref.safetensors"
    ).read_bytes()


def test_streamed_model_hashes_like_the_loaded_one(smollm2_3blocks):
    path = smollm2_3blocks
    streamed = api.load_model(str(path), stream=True)
    blocks = streamed.stream.blocks
    assert all(p.is_meta for p in blocks.parameters())
    assert not any(p.is_meta for n, p in streamed.model.named_parameters() if ".layers." not in n)
    assert streamed.model.lm_head.weight is streamed.model.model.embed_tokens.weight
    loaded = api.load_model(str(path))
    assert streamed.stream.scan() == tensor_sha256(loaded.model.state_dict())


@pytest.mark.parametrize(
    "fixture,method,settings",
    [
        ("smollm2_3blocks", "rtn", RTN),
        ("smollm2_3blocks", "gptq", RTN),
        # a method with a group step over 2 blocks (3 blocks: one group of 2, one of 1)
        ("smollm2_3blocks", "qllm", {"bits": 4, "abits": 4, "epochs": 1, "group_blocks": 2,
                                     "search_steps": 4}),
        # tied embeddings, Gemma norms and embedding scale: on a tiny random Gemma-3 in the
        # default suite, on the real model's first 2 blocks under -m slow (29 s)
        ("gemma3_tiny", "gptq", RTN),
        pytest.param("gemma3_2blocks", "gptq", RTN, marks=pytest.mark.slow),
    ],
)
def test_streamed_output_is_byte_identical(fixture, method, settings, request, tmp_path):
    path = request.getfixturevalue(fixture)
    normal = _quantize(path, tmp_path / "normal", method, settings)
    streamed = _quantize(path, tmp_path / "streamed", method, settings, stream=True)
    _assert_same_output(tmp_path / "normal", tmp_path / "streamed")
    assert streamed.avg_bits == normal.avg_bits
    states = [torch.load(tmp_path / f"{n}.ckpt" / "state.pt") for n in ("normal", "streamed")]
    assert states[0]["run"] == states[1]["run"]  # same fingerprint: resumable across modes
    for got, want in zip(streamed.layers, normal.layers, strict=True):
        assert _steady(got.to_dict()) == _steady(want.to_dict())


def test_at_most_one_group_of_blocks_is_in_memory(smollm2_3blocks, tmp_path, monkeypatch):
    from lowbit.engine.streaming import BlockStream

    live = []
    load = BlockStream.load

    def counting(self, block, index):
        load(self, block, index)
        live.append([i for i, b in enumerate(self.blocks) if _materialized(b)])

    monkeypatch.setattr(BlockStream, "load", counting)
    loaded = api.load_model(str(smollm2_3blocks), stream=True)
    assert live == [[0]]  # discovery reads block 0 once, for the block structure
    api.quantize(loaded, api.build_config("rtn", RTN), CALIB, False, workdir=tmp_path / "q.ckpt")
    assert live == [[0], [0], [1], [2]]
    assert not any(_materialized(b) for b in loaded.stream.blocks)
    with loaded.stream.quantized_block(1) as block:
        assert _materialized(block)
    assert not _materialized(block)


def _materialized(block):
    return any(not t.is_meta for t in block.state_dict().values())


def test_sharded_checkpoint_streams_to_the_same_bytes(smollm2_3blocks, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(smollm2_3blocks, dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="40MB")
    AutoTokenizer.from_pretrained(smollm2_3blocks).save_pretrained(sharded)
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    _quantize(smollm2_3blocks, tmp_path / "normal")
    _quantize(sharded, tmp_path / "streamed", stream=True)
    weights = [tmp_path / d / "model.safetensors" for d in ("normal", "streamed")]
    assert weights[0].read_bytes() == weights[1].read_bytes()


class _Crash(Exception):
    """Stands for the process dying while it quantizes a block."""


def _crashing(monkeypatch, index):
    registered = method_named("rtn")

    def apply_block(config, ctx):
        if ctx.index == index:
            raise _Crash
        return registered.apply_block(config, ctx)

    monkeypatch.setitem(METHODS, registered.config_cls, dataclasses.replace(registered,
        apply_block=apply_block))


@pytest.mark.parametrize("first_stream", [True, False])
def test_resume_continues_across_modes_exactly(smollm2_3blocks, tmp_path, first_stream):
    _quantize(smollm2_3blocks, tmp_path / "ref")
    out = tmp_path / "q"
    with pytest.MonkeyPatch.context() as mp:
        _crashing(mp, 2)
        with pytest.raises(_Crash):
            _quantize(smollm2_3blocks, out, stream=first_stream)
    assert not out.exists()
    _quantize(smollm2_3blocks, out, stream=True, resume=True)
    _assert_same_output(tmp_path / "ref", out)


def test_nan_weight_is_refused_before_any_block_with_the_same_message(smollm2_3blocks, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(smollm2_3blocks, bad)
    with safe_open(str(bad / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118
    tensors["model.layers.2.mlp.down_proj.weight"][0, :3] = float("nan")
    tensors["model.layers.1.self_attn.o_proj.weight"][1, 1] = float("inf")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    messages = []
    for stream in (False, True):
        with pytest.raises(LowbitError) as info:
            _quantize(bad, tmp_path / f"q{stream}", stream=stream)
        messages.append(str(info.value))
        assert not (tmp_path / f"q{stream}.ckpt").exists()
    print(messages[1])
    assert messages[0] == messages[1]
    assert messages[1].startswith("model weight model.layers.1.self_attn.o_proj.weight holds 0 NaN")


def test_streaming_refusals(smollm2_3blocks, tmp_path):
    loaded = api.load_model(str(smollm2_3blocks), stream=True)
    cases = [
        (lambda: api.quantize(loaded, api.build_config("rtn", RTN), CALIB, False), "pass workdir="),
        (lambda: api.quantize(loaded, api.build_config("lrqat", {}), CALIB, False,
            workdir=tmp_path / "w"),
         "method 'lrqat' trains the whole model at once and cannot stream"),
        (lambda: api.evaluate(loaded, ["austen-pp"], progress=False), "cannot be run"),
        (lambda: api.save_quantized(loaded, None, tmp_path / "o"), "is not quantized yet"),
    ]
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(smollm2_3blocks / "config.json", empty)
    cases.append((lambda: api.load_model(str(empty), stream=True), "has no safetensors weights"))
    for call, needle in cases:
        with pytest.raises(LowbitError, match=needle) as info:
            call()
        print(info.value)


def _estimate(path, stream, tmp_path, nsamples=4):
    calib = dataclasses.replace(CALIB, nsamples=nsamples)
    config = api.build_config("rtn", RTN)
    return api.preflight(str(path), config, calib, tmp_path / "out", stream=stream)


def test_preflight_parts_follow_the_files(smollm2_3blocks, tmp_path):
    with safe_open(str(smollm2_3blocks / "model.safetensors"), "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    nbytes = {k: 4 * torch.Size(s).numel() for k, s in sizes.items()}
    block = sum(v for k, v in nbytes.items() if k.startswith("model.layers.0."))
    rest = sum(v for k, v in nbytes.items() if ".layers." not in k)
    streamed = _estimate(smollm2_3blocks, True, tmp_path)
    normal = _estimate(smollm2_3blocks, False, tmp_path)
    print(streamed.describe(), normal.describe(), sep="\n")
    assert streamed.memory["weights outside the blocks"] == rest
    assert streamed.memory["2 blocks (full precision + dequantized copy)"] == 2 * block
    assert normal.memory["whole model (3 blocks)"] == sum(nbytes.values())
    assert normal.streamed_need == streamed.need
    acts = "calibration activations (2 x 4 x 32 x 576)"
    assert streamed.memory[acts] == normal.memory[acts] == 2 * 4 * 32 * 576 * 4
    assert streamed.disk["output"] < sum(nbytes.values())  # blocks at ~4.5 bits
    bigger = _estimate(smollm2_3blocks, True, tmp_path, nsamples=64)
    assert bigger.need - streamed.need == 2 * 60 * 32 * 576 * 4


def test_preflight_refuses_what_cannot_fit(smollm2_3blocks, tmp_path, monkeypatch):
    normal = _estimate(smollm2_3blocks, False, tmp_path)
    tight = dataclasses.replace(normal, available=normal.streamed_need + 1)
    with pytest.raises(LowbitError) as info:
        tight.check()
    print(info.value)
    assert "not enough memory" in str(info.value)
    assert "add --stream (needs about" in str(info.value) and "still" not in str(info.value)
    assert "lower --nsamples or --seqlen" in str(info.value)
    streamed = _estimate(smollm2_3blocks, True, tmp_path)
    with pytest.raises(LowbitError, match=r"lower --nsamples or --seqlen") as info:
        dataclasses.replace(streamed, available=streamed.need - 1).check()
    assert "--stream" not in str(info.value).split(";")[1]
    with pytest.raises(LowbitError, match="not enough disk") as info:
        dataclasses.replace(streamed, disk_free=1000).check()
    print(info.value)
    dataclasses.replace(streamed, available=streamed.need).check()


def test_cli_stream_reports_the_estimate_and_refuses_up_front(
    capsys, smollm2_3blocks, tmp_path, monkeypatch
):
    out = tmp_path / "q"
    argv = ["quantize", str(smollm2_3blocks), "--method", "rtn", "-g", "64", "--nsamples", "4",
            "--seqlen", "32", "--out", str(out), "--stream"]
    monkeypatch.setattr(preflight, "available_bytes", lambda: 64 * 2**20)
    assert main(argv) == 2
    out_text, err = capsys.readouterr()
    print(out_text, err)
    assert out_text.startswith("pre-flight (streamed): peak memory ~")
    assert err.startswith("lowbit: error: not enough memory") and err.count("\n") == 1
    assert not out.exists() and not (tmp_path / "q.ckpt").exists()

    assert main([*argv, "--no-preflight", "--json", str(tmp_path / "q.json")]) == 0
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["stream"] is True and report["preflight"]["stream"] is True
    assert report["preflight"]["available_bytes"] == 64 * 2**20
    assert not (tmp_path / "q.ckpt").exists()
    assert api.load_model(str(out)).manifest["method"] == "rtn"


# Started from a small process: a child's ru_maxrss starts at its parent's peak (Linux keeps
# it across exec), so measuring straight from pytest would give pytest's own peak.
_MEASURE = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, "
    "stderr=subprocess.DEVNULL); _, s, u = os.wait4(p.pid, 0); print(u.ru_maxrss); "
    "sys.exit(os.waitstatus_to_exitcode(s))"
)


def _peak_rss_mib(model, out, stream):
    """Peak RSS of `lowbit quantize` (RTN) in a fresh process, MiB."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MALLOC_MMAP_THRESHOLD_": "131072"}  # no heap fragmentation noise
    argv = [sys.executable, "-m", "lowbit.cli.main", "quantize", str(model), "--method", "rtn",
            "-g", "64", "--nsamples", "8", "--seqlen", "128", "--out", str(out)]
    argv += ["--stream"] if stream else []
    done = subprocess.run([sys.executable, "-c", _MEASURE, *argv], env=env, check=True,
                          capture_output=True, text=True)
    return int(done.stdout.split()[-1]) / 1024


@pytest.mark.slow
def test_streamed_peak_rss_does_not_grow_with_depth(smollm2_3blocks, tmp_path):
    """~1 min: 3 vs 12 blocks (9 x 14 MiB of fp32 weights more)."""
    from lowbit.models.fixtures import truncated_copy

    deep = truncated_copy("smollm2-135m", 12, tmp_path / "smollm2-12b")
    peaks = {(n, stream): _peak_rss_mib(m, tmp_path / f"q{n}{stream}", stream)
             for n, m in ((3, smollm2_3blocks), (12, deep)) for stream in (False, True)}
    print(peaks)
    assert abs(peaks[12, True] - peaks[3, True]) < 10
    assert peaks[12, False] - peaks[3, False] > 100
