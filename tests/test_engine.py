"""Engine tier: captured block inputs reproduce the model's own forward pass exactly."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit import api
from lowbit.algorithms.gptq import GPTQConfig
from lowbit.core.config import MethodConfig
from lowbit.engine.capture import block_output, capture_block_inputs
from lowbit.engine.context import BlockContext
from lowbit.engine.hessian import GramCache, HessianAccumulator
from lowbit.errors import LowbitError
from lowbit.formats.intq import IntGrid, rtn_quantize
from lowbit.formats.packed_int import PackedIntWeight
from lowbit.models.arch import get_blocks
from lowbit.nn.quant_linear import QuantLinear


@pytest.mark.parametrize("fixture", ["smollm2_2blocks", "gemma3_2blocks"])
def test_sequential_replay_equals_model_forward(fixture, request):
    loaded = api.load_model(str(request.getfixturevalue(fixture)))
    model, blocks = loaded.model, get_blocks(loaded.model, loaded.table)
    ids = torch.randint(5, 1000, (6, 32), generator=torch.Generator().manual_seed(0))
    seen = []
    hook = model.model.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():  # the forward in the replay's batches: matmul kernels (so summation
        for batch in (ids[:4], ids[4:]):  # order) may depend on the batch size on some CPUs
            model(batch, use_cache=False)
        hook.remove()
        store = capture_block_inputs(model, blocks, ids, batch_size=4)
        assert [x.shape[0] for x in store.hidden] == [4, 2]
        hidden = store.hidden
        for i, block in enumerate(blocks):
            hidden = [block_output(block, x, store.call_for(i, x)) for x in hidden]
    assert torch.equal(torch.cat(hidden), torch.cat(seen))
    assert all(
        isinstance(b, torch.nn.Module) and not type(b).__name__.startswith("_") for b in blocks
    )


def test_hessian_accumulator_matches_direct_sum():
    x = torch.randn(3, 10, 8)
    acc = HessianAccumulator(8)
    acc.add(x[:1])
    acc.add(x[1:])
    flat = x.reshape(-1, 8)
    torch.testing.assert_close(acc.hessian, 2 * flat.T @ flat / flat.shape[0])


def test_gram_cache_shares_one_input_and_not_a_modified_one():
    x, other = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    cache = GramCache()
    gram, n = cache.gram(x)
    flat = x.reshape(-1, 8)
    assert n == 10 and torch.equal(gram, flat.T @ flat)
    assert cache.gram(x)[0] is gram  # the same tensor again: shared, not recomputed
    assert not torch.equal(cache.gram(other)[0], gram)
    x.mul_(2)  # modified in place: its Gram matrix is computed anew
    assert torch.equal(cache.gram(x)[0], 4 * gram)


def test_qkv_hessians_equal_separate_accumulation(smollm2_2blocks):
    """q/k/v share one X^T X per batch; each Hessian equals its own accumulation (same
    values: the sharing only skips recomputing the same product)."""
    loaded = api.load_model(str(smollm2_2blocks))
    blocks = get_blocks(loaded.model, loaded.table)
    ids = torch.randint(5, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    store = capture_block_inputs(loaded.model, blocks, ids, batch_size=2)
    ctx = BlockContext(blocks[0], 0, "model.layers.0", loaded.table, store.hidden, store)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    shared = ctx.collect_hessians(names)
    inputs = []
    hook = ctx.module(names[0]).register_forward_pre_hook(lambda _m, a: inputs.append(a[0]))
    ctx.run()
    hook.remove()
    acc = HessianAccumulator(inputs[0].shape[-1])
    for x in inputs:
        acc.add(x)
    for name in names:
        assert torch.equal(shared[name], acc.hessian)


def test_rtn_runs_no_calibration_forward(tiny_model, monkeypatch):
    import lowbit.engine.sequential as sequential

    def no_capture(*_args, **_kwargs):
        raise AssertionError("RTN captured calibration inputs")

    monkeypatch.setattr(sequential, "capture_block_inputs", no_capture)
    loaded = api.load_model(str(tiny_model))
    linear = get_blocks(loaded.model, loaded.table)[0].get_submodule("mlp.down_proj")
    weight = linear.weight.detach().clone()
    config = api.build_config("rtn", {"bits": 4, "group_size": 32})
    result = api.quantize(loaded, config, api.CalibSpec("austen-emma", 2, 16, 0),
                          progress=False)
    quant = get_blocks(loaded.model, loaded.table)[0].get_submodule("mlp.down_proj")
    codes, scales, zeros = rtn_quantize(weight, config.grid)
    expected = PackedIntWeight.from_codes(codes, scales, zeros, config.grid).dequantize()
    assert torch.equal(quant.dequantized_weight(), expected)
    assert all(math.isnan(r.hessian_rel_err) and r.weight_rel_err > 0 for r in result.layers)


def test_quant_linear_matches_dequantized_matmul_and_caches():
    w = torch.randn(24, 40)
    grid = IntGrid(3, 16, False)
    from lowbit.formats.intq import rtn_quantize

    stored = PackedIntWeight.from_codes(*rtn_quantize(w, grid), grid, perm=torch.randperm(40))
    layer = QuantLinear(stored, torch.randn(24))
    x = torch.randn(5, 7, 40)
    expected = x @ stored.dequantize().T + layer.bias
    torch.testing.assert_close(layer(x), expected)
    assert set(dict(layer.named_buffers())) == {"qweight", "scales", "zeros", "perm", "bias"}
    # 3-bit codes + fp16 scale and 3-bit zero for each of 3 groups (16+16+8 columns) per row
    # + one int16 column index per 24-row column
    assert layer.bits_per_weight() == pytest.approx(3 + 3 * (16 + 3) / 40 + 16 / 24)


def test_config_json_round_trip_and_strict_keys():
    cfg = GPTQConfig(bits=3, group_size=64, ignore=("*.down_proj",), static_groups=True)
    again = MethodConfig.from_dict.__func__(GPTQConfig, cfg.to_dict())
    assert again == cfg and cfg.to_dict()["version"] == 1
    with pytest.raises(LowbitError, match="unknown key 'bitz'"):
        GPTQConfig.from_dict({"bitz": 3})
    with pytest.raises(LowbitError, match="config is for method 'rtn'"):
        GPTQConfig.from_dict({"method": "rtn"})
