"""Formats tier: the one granularity vocabulary, WeightSpec/ActSpec validation, and every method
config's specs (issue #18 item 2)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lowbit.algorithms import methods
from lowbit.algorithms.gptq import GPTQConfig, GPTQSettings, GPTQSolver, gptq_quantize
from lowbit.algorithms.qllm import QLLMConfig
from lowbit.algorithms.rtn import RTNConfig
from lowbit.algorithms.smoothquant import SmoothQuantConfig
from lowbit.algorithms.spqr import SpQRConfig, spqr_quantize
from lowbit.algorithms.wa_quant import WAConfig
from lowbit.algorithms.zqfp import ZQFPConfig
from lowbit.errors import LowbitError
from lowbit.formats.blockscale import BlockScaledConfig
from lowbit.formats.granularity import (
    Group,
    PerChannel,
    PerTensor,
    check_width,
    fits,
    from_stored,
    group_width,
    n_groups,
    parse_group_size,
    scale_grid,
    to_stored,
)
from lowbit.formats.intq import IntGrid
from lowbit.formats.packed_int import PackedIntWeight
from lowbit.formats.spec import ActSpec, WeightSpec
from lowbit.nn.act_quant import ActQuantizer

# ---- granularity ----------------------------------------------------------------------------


def test_group_size_spelling_and_its_one_rule():
    assert parse_group_size(-1) == PerChannel()
    assert parse_group_size(2) == Group(2)
    assert parse_group_size(64, ragged=True).ragged
    for bad in (0, 1, -2, True):
        with pytest.raises(LowbitError, match="--group-size") as err:
            parse_group_size(bad)
        assert ">= 2" in str(err.value)
    with pytest.raises(LowbitError, match="--group-size"):
        Group(1)


def test_widths_groups_and_ragged_permission():
    assert group_width(PerChannel(), 100) == 100 and n_groups(PerChannel(), 100) == 1
    assert group_width(Group(32), 100) == 32 and n_groups(Group(32), 100) == 4  # 32+32+32+4
    assert scale_grid(PerTensor(), 3, 5) == (1, 1, 15)
    assert scale_grid(Group(32), 3, 100) == (3, 4, 32)
    with pytest.raises(ValueError, match="per-tensor"):
        group_width(PerTensor(), 8)
    assert fits(Group(32), 96) and not fits(Group(32), 100) and fits(Group(32, True), 100)
    with pytest.raises(LowbitError, match="--ragged-groups") as err:
        check_width(Group(32), "q_proj", 100, [100, 200])
    assert "-1 (per channel)" in str(err.value)
    check_width(Group(32, ragged=True), "q_proj", 100, [100])
    assert Group(32) == Group(32, ragged=True)  # a permission, not a different grid


def test_stored_spelling_round_trips():
    for g in (PerTensor(), PerChannel(), Group(16)):
        assert from_stored(to_stored(g)) == g
    assert (to_stored(PerTensor()), to_stored(PerChannel()), to_stored(Group(7))) == (0, -1, 7)
    assert from_stored(48).ragged  # a stored weight has whatever width it has
    for bad in (1, -2, "32"):
        with pytest.raises(ValueError):
            from_stored(bad)


def test_formats_hold_a_granularity_and_keep_their_metadata():
    grid = IntGrid(4, 32, False)  # the stored spelling, as saved metadata holds it
    assert grid.granularity == Group(32) and grid.group_size == 32
    assert grid.to_meta() == {"bits": 4, "group_size": 32, "symmetric": False, "round_zero": True}
    assert IntGrid.from_meta(grid.to_meta()) == grid
    assert IntGrid(3, PerChannel()).to_meta()["group_size"] == -1
    with pytest.raises(ValueError, match="per tensor"):
        IntGrid(4, PerTensor())
    cfg = BlockScaledConfig("fp4_e2m1", PerTensor(), "fp16")
    assert cfg.to_dict()["group_size"] == 0 and BlockScaledConfig.from_dict(cfg.to_dict()) == cfg
    assert list(cfg.to_dict()) == ["element", "group_size", "scale_format", "scale_rule",
                                   "tensor_scale", "version"]
    assert BlockScaledConfig("fp4_e2m1", 32) == BlockScaledConfig("fp4_e2m1", Group(32))
    w = torch.randn(6, 40)
    packed = PackedIntWeight.from_codes(*_rtn(w, grid), grid)
    assert packed.meta()["grid"] == grid.to_meta()
    back = PackedIntWeight.from_stored(packed.meta(), packed.tensors())
    assert torch.equal(back.dequantize(), packed.dequantize())


def _rtn(w, grid):
    from lowbit.formats.intq import rtn_quantize

    return rtn_quantize(w, grid)


# ---- WeightSpec / ActSpec -------------------------------------------------------------------


def test_weight_spec_validation_names_the_flag():
    spec = WeightSpec("fp8_e4m3", PerChannel(), True, "fp16")
    assert (spec.bits, spec.is_float) == (8, True)
    assert WeightSpec("int3", Group(16), symmetric=False).bits == 3
    cases = [
        ({"format": "fp9"}, "--weight-format"),
        ({"format": "uint4"}, "--weight-format"),
        ({"format": "e8m0"}, "--weight-format"),
        ({"format": "fp4_e2m1", "symmetric": False}, "--asym"),
        ({"granularity": 32}, "--group-size"),
        ({"scale_format": "int8"}, "integer format"),
        ({"scale_format": "fp99"}, "unknown number format"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(LowbitError, match=needle):
            WeightSpec(**kwargs)
    assert IntGrid.from_spec(WeightSpec("int4", Group(64))) == IntGrid(4, Group(64))
    with pytest.raises(ValueError, match="integer grid"):
        IntGrid.from_spec(WeightSpec("fp4_e2m1"))
    block = BlockScaledConfig.from_spec(WeightSpec("fp4_e2m1", Group(32), True, "e8m0"), "m1")
    assert block == BlockScaledConfig("fp4_e2m1", 32, "e8m0", "m1")


def test_act_spec_validation_and_none():
    none = ActSpec.none()
    assert not none.quantized and none.bits == 16 and none == ActSpec()
    assert ActSpec.integer(16) is none
    spec = ActSpec.integer(6, symmetric=False)
    assert (spec.format, spec.granularity, spec.symmetric, spec.quantized) == (
        "int6", "token", False, True)
    cases = [
        (lambda: ActSpec("e8m0"), "--act-format"),
        (lambda: ActSpec("uint8"), "--act-format"),
        (lambda: ActSpec("int8", "channel"), "--act-granularity"),
        (lambda: ActSpec("fp8_e4m3", symmetric=False), "asymmetric"),
        (lambda: ActSpec("int8", "tensor", symmetric=False), "asymmetric"),
        (lambda: ActSpec(None, "tensor"), "none"),
        (lambda: ActSpec.integer(9), "--abits"),
        (lambda: ActSpec.integer(1), "--abits"),
    ]
    for make, needle in cases:
        with pytest.raises(LowbitError, match=needle):
            make()


def test_act_quantizer_from_spec_keeps_its_meta():
    token = ActQuantizer.from_spec(ActSpec("int8", symmetric=False))
    assert token.meta() == ActQuantizer("int8", "token", symmetric=False).meta()
    assert token.spec == ActSpec("int8", symmetric=False)
    static = ActQuantizer.from_spec(ActSpec("fp8_e4m3", "tensor"), absmax=448.0)
    assert static.meta() == {"format": "fp8_e4m3", "granularity": "tensor",
                             "execution_cpu": static.meta()["execution_cpu"]}
    assert float(static.scale) == 1.0
    x = torch.randn(3, 16) * 100
    assert torch.equal(static(x), ActQuantizer.static("fp8_e4m3", 448.0)(x))
    with pytest.raises(ValueError, match="absmax"):
        ActQuantizer.from_spec(ActSpec("fp8_e4m3", "tensor"))
    with pytest.raises(ValueError, match="not quantized"):
        ActQuantizer.from_spec(ActSpec.none())


# ---- method configs -------------------------------------------------------------------------


def test_every_config_has_specs_and_option_metadata():
    for method in methods().values():
        cls = method.config_cls
        config = cls()
        assert isinstance(config.weight_spec, WeightSpec), method.name
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{method.name}.{f.name} has no help"
            assert all(isinstance(c, str) for c in f.metadata["choices"])
        assert "Attributes:" not in (cls.__doc__ or ""), method.name
    act = {m.name for m in methods().values() if hasattr(m.config_cls(), "act_spec")}
    assert {"qllm", "smoothquant", "zqfp"} <= act
    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(ZQFPConfig)}
    assert choices["scale_constraint"] == ("none", "m1", "m2")
    assert "none" in choices["act_format"] and "fp4_e2m1" in choices["weight_format"]


def test_int_configs_validate_through_the_spec():
    spec = RTNConfig(bits=3, group_size=48, symmetric=False, ragged_groups=True).weight_spec
    assert spec == WeightSpec("int3", Group(48), False) and spec.granularity.ragged
    assert RTNConfig(group_size=-1).weight_spec.granularity == PerChannel()
    for kwargs, needle in [({"bits": 9}, "--bits"), ({"group_size": 1}, "--group-size"),
                           ({"group_size": 0}, "--group-size")]:
        for cls in (RTNConfig, GPTQConfig, SpQRConfig, QLLMConfig):
            with pytest.raises(LowbitError, match=needle):
                cls(**kwargs)
    assert RTNConfig(group_size=64).estimated_bits() == 4.5
    assert RTNConfig(group_size=-1).estimated_bits() == 4.0
    assert SpQRConfig().grid == IntGrid(3, Group(16), symmetric=False, round_zero=False)


def test_wa_and_zqfp_map_no_activation_quantization_to_the_same_spec():
    assert WAConfig(abits=16).act_spec == ActSpec.none()
    assert SmoothQuantConfig(abits=16).act_quantizer() is None
    assert ZQFPConfig(act_format="none").act_spec == ActSpec.none()
    assert ZQFPConfig(act_format="none", abits=16).act_quantizer(1.0) is None
    assert QLLMConfig(abits=8, act_symmetric=True).act_spec == ActSpec("int8")
    q = QLLMConfig(abits=4).act_quantizer()
    assert q.meta() == ActQuantizer("int4", "token", symmetric=False).meta()
    tensor = ZQFPConfig(act_format="int8", act_granularity="tensor")
    assert tensor.act_quantizer(127.0).meta()["granularity"] == "tensor"


def test_zqfp_derives_bits_without_rewriting_its_fields():
    c = ZQFPConfig(weight_format="fp8_e4m3", act_format="int8", group_size=-1)
    assert (c.bits, c.abits) == (0, 0)  # as given
    assert (c.weight_spec.bits, c.act_spec.bits) == (8, 8)
    assert c.to_dict()["bits"] == 0 and ZQFPConfig.from_dict(c.to_dict()) == c
    assert c.estimated_bits() == 8.0
    assert ZQFPConfig(bits=4, abits=8, group_size=64) == ZQFPConfig(bits=4, abits=8, group_size=64)
    assert ZQFPConfig(bits=4, abits=8).weight_spec == ZQFPConfig().weight_spec  # explicit = derived
    assert ZQFPConfig(weight_format="int4", group_size=64).grid == IntGrid(4, Group(64))
    with pytest.raises(LowbitError, match="contradicts the weight format"):
        ZQFPConfig(bits=8)
    with pytest.raises(LowbitError, match="contradicts the activation format"):
        ZQFPConfig(act_format="none", abits=8)
    m1 = ZQFPConfig(scale_constraint="m1", group_size=-1)
    assert m1.weight_spec.scale_format == "e8m0"
    assert m1.block_config == BlockScaledConfig("fp4_e2m1", PerChannel(), "e8m0", "m1")


# ---- the GPTQ solver ------------------------------------------------------------------------


def test_gptq_solver_settings_are_shared_by_gptq_spqr_and_zqfp():
    shared = {f.name for f in dataclasses.fields(GPTQSettings)}
    for cls in (GPTQConfig, SpQRConfig, ZQFPConfig):
        assert issubclass(cls, GPTQSettings)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert {"percdamp", "act_order", "block_size", "true_sequential"} <= shared <= set(fields)
        assert fields["percdamp"].metadata == GPTQSettings.__dataclass_fields__[
            "percdamp"].metadata
    assert "static_groups" not in {f.name for f in dataclasses.fields(SpQRConfig)}
    assert GPTQConfig(percdamp=0.1, act_order=False, static_groups=True, block_size=64).solver == (
        GPTQSolver(0.1, False, True, 64))
    assert SpQRConfig().solver == GPTQSolver(percdamp=1.0, static_groups=False)
    assert ZQFPConfig().solver.static_groups  # ZeroQuant-FP's own default
    for cls in (GPTQConfig, SpQRConfig):
        for kwargs, needle in [({"percdamp": 0}, "--percdamp"), ({"percdamp": float("nan")},
                                                                  "--percdamp"),
                               ({"block_size": 0}, "--block-size")]:
            with pytest.raises(LowbitError, match=needle):
                cls(**kwargs)
    recipe = json.loads(json.dumps(SpQRConfig(percdamp=0.5).to_dict()))
    assert recipe["percdamp"] == 0.5 and "solver" not in recipe  # recipe keys stay flat


def test_spqr_and_gptq_read_the_same_solver():
    """SpQR with per-row groups, no outliers and exact statistics is GPTQ on the asymmetric
    per-channel grid with real zeros: the one solver object drives both loops alike."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    h = 2 * x.T @ x / 256
    w = torch.randn(16, 32, generator=g)
    config = SpQRConfig(bits=8, group_size=-1, outlier_threshold=float("inf"), qq_scale_bits=8,
                        qq_zero_bits=8, beta2=1, percdamp=0.1, block_size=8)
    spqr = spqr_quantize(w, h, config)
    grid = IntGrid(8, PerChannel(), symmetric=False, round_zero=False)
    gptq = gptq_quantize(w, h, grid, config.solver)
    assert spqr.percdamp == gptq.percdamp == 0.1
    assert torch.equal(spqr.perm, gptq.perm)
