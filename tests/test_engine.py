"""Engine tier: captured block inputs reproduce the model's own forward pass exactly."""

from __future__ import annotations

import pytest
import torch

from lowbit import api
from lowbit.algorithms.gptq import GPTQConfig
from lowbit.core.config import MethodConfig
from lowbit.engine.capture import block_output, capture_block_inputs
from lowbit.engine.hessian import HessianAccumulator
from lowbit.errors import LowbitError
from lowbit.formats.intq import IntGrid
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
