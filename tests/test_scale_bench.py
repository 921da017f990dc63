"""benchmarks/scale_blocks.py on a tiny block: the block builder and the engine's per-group step
with stage timing run GPTQ, SpQR and QLLM, and the extrapolation to the target tokens is the
stated arithmetic (token stages scaled, fixed stages kept, whole model = blocks x per block)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale_blocks.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("scale_blocks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("method", ["gptq", "spqr", "qllm"])
def test_block_stages_are_timed(bench, method):
    shape = bench.BlockShape("tiny", 64, 128, 4, 2, blocks=2)
    fast = {"epochs": 1, "search_steps": 2} if method == "qllm" else {}  # every stage, briefly
    run = bench.measure_block(shape, method, 2, 32, torch.device("cpu"), torch.float32, batch=2,
                              settings=fast)
    stages = run["stages_s"]
    assert set(stages) == set(bench.STAGES)
    assert all(math.isfinite(s) and s >= 0 for s in stages.values())
    assert run["layers"] == 7  # q, k, v, o, gate, up, down each reported
    # every stage lies inside the measured total (one clock around the group step)
    assert sum(stages.values()) <= run["total_s"] * 1.001 + 1e-3
    if method == "qllm":
        assert stages["stats"] > 0 and stages["correction"] > 0 and stages["hessians"] == 0
    else:
        assert stages["hessians"] > 0 and stages["solve"] > 0 and stages["correction"] == 0
    assert stages["outputs"] > 0
    assert run["activation_bytes"] == 2 * 32 * 64 * 4  # fp32 [2, 32, 64]
    assert run["block_weight_bytes"] == bench.block_params(shape) * 4
    assert math.isfinite(run["peak_rss_mib"]) and run["peak_rss_mib"] > 0


def test_block_shape_and_dtype(bench):
    shape = bench.BlockShape("tiny", 64, 128, 4, 2, blocks=2)
    model, table = bench.llama_block(shape, torch.bfloat16, 32)
    block = model.model.layers[0]
    assert len(model.model.layers) == 1
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert block.self_attn.k_proj.weight.shape == (2 * 16, 64)  # 2 KV heads of 64 / 4
    assert block.mlp.down_proj.weight.shape == (64, 128)
    assert sum(p.numel() for p in block.parameters()) == bench.block_params(shape)
    llama3_8b = bench.SHAPES["8b"]  # 218 M parameters per block, 32 blocks (~7.0 of 8.0 B)
    assert bench.block_params(llama3_8b) == 218_112_000
    assert set(table.linear_names) >= {"self_attn.q_proj", "mlp.down_proj"}


def test_extrapolation_arithmetic(bench):
    shape = bench.BlockShape("tiny", 64, 128, 4, 2, blocks=10)
    run = {
        "nsamples": 4, "seqlen": 2048,
        "stages_s": {"hessians": 3.0, "stats": 1.0, "solve": 5.0, "other": 2.0, "outputs": 4.0,
                     "correction": 6.0},
        "activation_bytes": 1000, "activation_copies": 2, "activation_home": "cpu",
        "peak_rss_mib": 100.0,
    }
    x = bench.extrapolate(run, shape, (128, 2048))
    assert x["token_factor"] == 32
    assert x["stages_s"] == {"hessians": 96.0, "stats": 32.0, "solve": 5.0, "other": 2.0,
                             "outputs": 128.0, "correction": 192.0}
    assert x["block_s"] == 455.0
    assert x["model_hours"] == pytest.approx(10 * 455.0 / 3600)
    assert x["activation_bytes"] == 32000
    assert x["peak_estimate_mib"] == pytest.approx(100.0 + 31000 * 2 / 2**20)
