"""Multi-process calibration (torch.distributed, gloo on CPU) against the single-process run."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lowbit import api
from lowbit.engine import distributed
from lowbit.engine.capture import capture_block_inputs
from lowbit.engine.context import BlockContext
from lowbit.errors import LowbitError
from lowbit.models.arch import get_blocks
from lowbit.nn.quant_linear import QuantLinear

CALIB = api.CalibSpec(nsamples=8, seqlen=64, batch_size=8)
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _block0_hessians(loaded, ids):
    blocks = get_blocks(loaded.model, loaded.table)
    inputs = capture_block_inputs(loaded.model, blocks, ids, 8)
    ctx = BlockContext(blocks[0], 0, "model.layers.0", loaded.table, inputs.hidden, inputs)
    return ctx.collect_hessians(["self_attn.q_proj", "mlp.down_proj"])


def _calib_ids(loaded):
    from lowbit.data.calibration import calibration_batch
    from lowbit.data.corpora import load_text

    return calibration_batch(loaded.tokenizer, load_text(CALIB.corpus), CALIB.nsamples,
                             CALIB.seqlen, CALIB.seed, loaded.add_bos)


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: m.dequantized_weight() for n, m in model.named_modules()
            if isinstance(m, QuantLinear)}


def _worker(rank: int, port: int, path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    assert distributed.init_from_env()
    loaded = api.load_model(path)
    hessians = _block0_hessians(loaded, distributed.shard(_calib_ids(loaded)))
    results = {"hessians": hessians}
    for method in ("rtn", "gptq"):
        loaded = api.load_model(path)
        res = api.quantize(loaded, api.build_config(method, {"bits": 4, "group_size": 64}), CALIB,
            progress=False)
        results[method] = (_weights(loaded.model), [r.hessian_rel_err for r in res.layers])
    if rank == 0:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(smollm2_2blocks, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist") / "rank0.pt")
    mp.start_processes(_worker, args=(_free_port(), str(smollm2_2blocks), out), nprocs=WORLD,
                       join=True, start_method="spawn")
    return torch.load(out, weights_only=False)


@pytest.mark.usefixtures("one_thread")
def test_hessians_are_summed_over_processes(two_processes, smollm2_2blocks):
    loaded = api.load_model(str(smollm2_2blocks))
    single = _block0_hessians(loaded, _calib_ids(loaded))
    for name, h in single.items():
        assert torch.allclose(two_processes["hessians"][name], h, rtol=1e-5, atol=1e-7), name


@pytest.mark.usefixtures("one_thread")
def test_rtn_is_identical_and_gptq_as_good(two_processes, smollm2_2blocks):
    single = {}
    for method in ("rtn", "gptq"):
        loaded = api.load_model(str(smollm2_2blocks))
        res = api.quantize(loaded, api.build_config(method, {"bits": 4, "group_size": 64}), CALIB,
            progress=False)
        single[method] = (_weights(loaded.model), [r.hessian_rel_err for r in res.layers])
    weights, _ = two_processes["rtn"]
    assert all(torch.equal(weights[n], w) for n, w in single["rtn"][0].items())
    # GPTQ's error feedback turns float-order differences of the Hessian into different but
    # equally good roundings: the mean output error must agree
    dist_err = sum(two_processes["gptq"][1]) / len(two_processes["gptq"][1])
    single_err = sum(single["gptq"][1]) / len(single["gptq"][1])
    assert dist_err == pytest.approx(single_err, rel=0.05)


def test_single_process_methods_are_refused_under_torchrun(monkeypatch, smollm2_2blocks):
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 2))
    loaded = api.load_model(str(smollm2_2blocks))
    with pytest.raises(LowbitError, match="method 'qllm' runs in one process; under torchrun "
                       "use one of: clip, gptq, rtn, spqr, zqfp"):
        api.quantize(loaded, api.build_config("qllm", {}), CALIB, progress=False)
    with pytest.raises(LowbitError, match="--resume is for single-process runs"):
        api.quantize(loaded, api.build_config("rtn", {"group_size": 64}), CALIB, progress=False,
            resume=True)
