"""Devices and forward dtypes: ``--device``/``device=`` (the engine moves each block to the
device and back; calibration activations on the device or in pinned CPU memory) and the
checkpoint's dtype kept (a bf16 model loads, quantizes, saves and reloads as bf16).

The ``gpu`` tests run every method on a tiny random model on CUDA and on the CPU and compare:
RTN's weights are identical (min-max, one division and a rounding per weight, all exactly
rounded in IEEE fp32 on either device); the other methods' solves take other summation orders
(cuBLAS vs. MKL matmuls, Cholesky) and may round a few weights the other way, so their output
error to the full-precision model on CUDA must be within ``GPU_TOLERANCE`` (relative) of the
CPU's. Run them with ``pytest -m gpu tests/test_device.py`` on a machine with CUDA.
"""

from __future__ import annotations

import json

import pytest
import torch

from lowbit import api
from lowbit.algorithms.clip import ClipConfig
from lowbit.algorithms.gptq import GPTQConfig
from lowbit.algorithms.lrqat import LRQATConfig
from lowbit.algorithms.qllm import QLLMConfig
from lowbit.algorithms.rtn import RTNConfig
from lowbit.algorithms.smoothquant import SmoothQuantConfig
from lowbit.algorithms.spqr import SpQRConfig
from lowbit.algorithms.zqfp import ZQFPConfig
from lowbit.cli.main import main
from lowbit.engine import placement
from lowbit.errors import LowbitError
from lowbit.nn.quant_linear import QuantLinear

CALIB = api.CalibSpec(nsamples=4, seqlen=32, batch_size=2)
# output error (mean squared logit difference to the full-precision model) on CUDA vs. on the
# CPU: |cuda / cpu - 1| below this. A few weights rounded the other way move a tiny model's
# error by a few percent; a device bug (a wrong Hessian, a lost update) moves it by far more.
GPU_TOLERANCE = 0.15

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as one without CUDA, whatever it has."""
    monkeypatch.setattr(placement, "_cuda", lambda: False)


# ---------------------------------------------------------------- devices, any machine


def test_auto_is_cpu_without_cuda(no_cuda, monkeypatch):
    monkeypatch.delenv(placement.AUTO_ENV, raising=False)
    assert placement.resolve_device("auto") == torch.device("cpu")
    assert placement.resolve_device(None) == torch.device("cpu")
    assert placement.resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_cuda_is_one_line_error(no_cuda):
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(LowbitError, match="--device: 'cuda.*CUDA is not available"):
            api.as_device(spec)
    with pytest.raises(LowbitError, match="--device: 'tpu' is not a device"):
        api.as_device("tpu")
    with pytest.raises(LowbitError, match="--device: device type 'mps' is not supported"):
        api.as_device("mps")


@pytest.mark.parametrize("command", ["quantize", "eval", "generate"])
def test_cli_device_cuda_without_cuda_exits_2(no_cuda, command, tmp_path, capsys):
    argv = {
        "quantize": ["quantize", "missing-model", "--method", "rtn", "--out", str(tmp_path / "o")],
        "eval": ["eval", "missing-model"],
        "generate": ["generate", "missing-model", "--prompt", "x"],
    }[command]
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("lowbit: error: --device: 'cuda' asked for, but CUDA is not")


def test_cli_bench_device_cuda_without_cuda_exits_2(no_cuda, capsys):
    assert main(["bench", "decode", "missing-model", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_auto_under_torchrun_is_the_local_rank_gpu(monkeypatch):
    """torchrun gives each process ``LOCAL_RANK``: ``auto`` and ``cuda`` mean that GPU (wrapping
    round when there are more processes than GPUs), not every rank's cuda:0."""
    monkeypatch.delenv(placement.AUTO_ENV, raising=False)
    monkeypatch.setattr(placement, "_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for local_rank, index in (("0", 0), ("1", 1), ("3", 1)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert placement.resolve_device("auto") == torch.device("cuda", index)
        assert placement.resolve_device("cuda") == torch.device("cuda", index)
        assert placement.resolve_device("cuda:0") == torch.device("cuda", 0)
    monkeypatch.delenv("LOCAL_RANK")
    assert placement.resolve_device("auto") == torch.device("cuda", 0)


def test_activations_stay_on_cpu_device():
    """On the CPU nothing moves: the same tensors, unpinned."""
    x = torch.randn(2, 3)
    assert placement.activation_home(torch.device("cpu"), 10**15, 0) == torch.device("cpu")
    assert placement.home(x, torch.device("cpu"), pin=False) is x
    assert placement.to_device({"a": (x, None)}, torch.device("cpu"))["a"][0] is x


def test_device_cpu_gives_the_default_weights(tiny_model):
    """``device="cpu"`` is the path every run took before devices existed (the suite's auto,
    ``$LOWBIT_AUTO_DEVICE``, is the CPU as well): the same stored tensors, bit for bit."""
    results = []
    for device in ("cpu", None):
        loaded = api.load_model(str(tiny_model))
        kwargs = {} if device is None else {"device": device}
        api.quantize(loaded, GPTQConfig(bits=4, group_size=32), CALIB, progress=False, **kwargs)
        results.append({k: v.clone() for k, v in loaded.model.state_dict().items()})
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


# ---------------------------------------------------------------- dtypes


@pytest.fixture(scope="module")
def tiny_bf16(tiny_model, tmp_path_factory):
    """The tiny random Llama saved in bf16 (``save_pretrained`` of a bf16 copy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-bf16")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return path


def _float_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in model.state_dict().values() if t.is_floating_point()}


def test_dtype_names():
    from lowbit.loading import dtype_named

    assert dtype_named("auto") is None and dtype_named(None) is None
    assert dtype_named("bfloat16") is dtype_named("bf16") is torch.bfloat16
    assert dtype_named("float16") is torch.float16
    with pytest.raises(LowbitError, match="--dtype: 'int8' is not a forward dtype"):
        dtype_named("int8")


def test_fp32_checkpoint_loads_fp32(tiny_model):
    loaded = api.load_model(str(tiny_model))
    assert loaded.dtype == torch.float32
    assert _float_dtypes(loaded.model) == {torch.float32}


def test_bf16_checkpoint_quantizes_saves_and_reloads_in_bf16(tiny_bf16, tmp_path):
    loaded = api.load_model(str(tiny_bf16))
    assert loaded.dtype == torch.bfloat16
    assert _float_dtypes(loaded.model) == {torch.bfloat16}  # no fp32 copy of any weight
    result = api.quantize(loaded, GPTQConfig(bits=4, group_size=32), CALIB, progress=False)
    assert all(0 < r.hessian_rel_err < 1 for r in result.layers)  # fp32 solve on bf16 inputs
    out = api.save_quantized(loaded, result, tmp_path / "q")
    assert json.loads((out / "lowbit.json").read_text())["dtype"] == "bfloat16"
    back = api.load_model(str(out))
    assert back.dtype == torch.bfloat16
    assert back.model.get_input_embeddings().weight.dtype == torch.bfloat16
    scores = api.evaluate(back, ["austen-pp"], kld=True, seqlen=32, max_tokens=128,
                          progress=False)
    assert scores["kld"] >= 0 and 1 < scores["ppl"]["austen-pp"] < 1e6
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert back.model(ids).logits.dtype == torch.bfloat16
        # the quantized linears hold what the in-memory run installed
        y_saved = back.model(ids).logits.float()
        y_run = loaded.model(ids).logits.float()
    assert torch.equal(y_saved, y_run)


def test_dtype_overrides_the_checkpoint(tiny_bf16):
    loaded = api.load_model(str(tiny_bf16), "float32")
    assert loaded.dtype == torch.float32
    assert _float_dtypes(loaded.model) == {torch.float32}


def test_cli_quantize_bf16_records_dtype(tiny_bf16, tmp_path, capsys):
    out, report = tmp_path / "q", tmp_path / "r.json"
    argv = ["quantize", str(tiny_bf16), "--method", "rtn", "--bits", "4", "--group-size", "32",
            "--nsamples", "2", "--seqlen", "32", "--out", str(out), "--json", str(report),
            "--device", "cpu"]
    assert main(argv) == 0
    data = json.loads(report.read_text())
    assert (data["device"], data["dtype"]) == ("cpu", "bfloat16")
    assert main(["eval", str(out), "--max-tokens", "64", "--seqlen", "32", "--device", "cpu",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["dtype"] == "bfloat16"
    capsys.readouterr()


# ---------------------------------------------------------------- gpu: cuda vs cpu

METHODS = {
    "rtn": RTNConfig(bits=4, group_size=32),
    "gptq": GPTQConfig(bits=4, group_size=32),
    "clip": ClipConfig(bits=4, group_size=32),
    "spqr": SpQRConfig(bits=3, group_size=16),
    "zqfp_lorc": ZQFPConfig(bits=4, abits=8, group_size=32, lorc_rank=4),
    "smoothquant": SmoothQuantConfig(),
    "qllm": QLLMConfig(group_blocks=2, epochs=2),
    "lrqat": LRQATConfig(bits=4, group_size=32, rank=4, steps=4, batch_size=2, train_seqlen=32,
                         checkpoint_every=0),
}


def _quantized(path, config, device: str) -> torch.nn.Module:
    loaded = api.load_model(str(path))
    api.quantize(loaded, config, CALIB, progress=False, device=device)
    for m in loaded.model.modules():  # back in CPU memory, whatever the device
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            assert t.device.type == "cpu"
    return loaded.model


def _output_error(path, model: torch.nn.Module) -> float:
    base = api.load_model(str(path)).model
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((model(ids).logits - base(ids).logits).square().mean())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_on_cuda_matches_cpu(tiny_model, method):
    config = METHODS[method]
    on_cpu = _quantized(tiny_model, config, "cpu")
    on_cuda = _quantized(tiny_model, config, "cuda")
    if method == "rtn":
        cpu_state, cuda_state = on_cpu.state_dict(), on_cuda.state_dict()
        for key, value in cpu_state.items():
            assert torch.equal(value, cuda_state[key]), key
        return
    err_cpu, err_cuda = _output_error(tiny_model, on_cpu), _output_error(tiny_model, on_cuda)
    assert err_cpu > 0
    assert abs(err_cuda / err_cpu - 1) < GPU_TOLERANCE, (err_cpu, err_cuda)
    assert sum(isinstance(m, QuantLinear) for m in on_cuda.modules()) == sum(
        isinstance(m, QuantLinear) for m in on_cpu.modules()
    )


@pytest.mark.gpu
@needs_cuda
def test_pinned_activations_give_the_device_resident_result(tiny_model, monkeypatch):
    """Activations that do not fit the device live in pinned CPU memory: same weights."""
    config = GPTQConfig(bits=4, group_size=32)
    resident = _quantized(tiny_model, config, "cuda").state_dict()
    homes = []

    def nowhere_free(device, activation_bytes, reserve_bytes):
        homes.append(torch.device("cpu"))
        return torch.device("cpu")

    monkeypatch.setattr("lowbit.engine.sequential.activation_home", nowhere_free)
    pinned = _quantized(tiny_model, config, "cuda").state_dict()
    assert homes
    for key, value in resident.items():
        assert torch.equal(value, pinned[key]), key


@pytest.mark.gpu
@needs_cuda
def test_bf16_on_cuda(tiny_bf16):
    loaded = api.load_model(str(tiny_bf16))
    api.quantize(loaded, GPTQConfig(bits=4, group_size=32), CALIB, progress=False, device="cuda")
    scores = api.evaluate(loaded, ["austen-pp"], seqlen=32, max_tokens=128, progress=False,
                          device="cuda")
    assert 1 < scores["ppl"]["austen-pp"] < 1e6
