"""LR-QAT and full QAT on a tiny random Llama: downcast, range search, gradients, straight-through
rounding, merge exactness, schedule, and bit-identical resumption."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_eval import tiny_llama  # a random 2-block Llama, hidden 32, MLP 64

from lowbit.algorithms.lrqat import LRQATConfig, attach, merge
from lowbit.algorithms.lrqat_train import lr_factor, start_fingerprint, train
from lowbit.engine.model_context import CheckpointStore
from lowbit.errors import LowbitError
from lowbit.formats.fixed_point import from_fixed_point8, grid_range, to_fixed_point8
from lowbit.formats.intq import IntGrid, expand_groups
from lowbit.formats.range_search import lp_scales
from lowbit.models.arch import get_blocks
from lowbit.models.discovery import table_of
from lowbit.nn.fake_quant_linear import FakeQuantSTE, LRQATLinear, QATLinear
from lowbit.nn.quant_linear import QuantLinear

VOCAB = 64  # token ids drawn below this


def config(**kw) -> LRQATConfig:
    base = dict(
        bits=3,
        rank=4,
        alpha=4.0,
        steps=6,
        lr=1e-2,
        scale_lr=1e-3,
        weight_lr=1e-3,
        batch_size=2,
        train_seqlen=16,
        checkpoint_every=2,
    )
    return LRQATConfig(**{**base, **kw})


def batches(cfg: LRQATConfig, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (cfg.steps * cfg.batch_size, cfg.train_seqlen), generator=gen)


def prepared(cfg: LRQATConfig, seed: int = 0):
    model = tiny_llama(seed)
    table = table_of(model)
    blocks = get_blocks(model, table)
    return model, blocks, attach(model, blocks, table, cfg)


def run(cfg, store=None, seed=0):
    """Train a fresh tiny model; returns (model, layers, run facts, integers before training)."""
    model, blocks, layers = prepared(cfg, seed)
    with torch.no_grad():
        ints0 = {n: m.integers().clone() for n, m in layers.items()}
    meta = {"config": cfg.resume_key(), "data_sha256": "d"}
    meta["start_sha256"] = start_fingerprint(layers)
    facts = train(model, blocks, layers, batches(cfg), cfg, meta, store, progress=False)
    return model, layers, facts, ints0


# --- formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 7])
def test_fixed_point_roundtrip_is_exact(bits):
    frac = 8 - bits
    qmin, qmax = grid_range(bits)
    codes = torch.arange(qmin << frac, (qmax << frac) + 1, dtype=torch.int8)
    values = from_fixed_point8(codes, bits)
    assert torch.equal(to_fixed_point8(values, bits), codes)  # every grid value round-trips
    x = torch.randn(4000) * 2 ** (bits - 1)
    q = to_fixed_point8(x, bits)
    assert q.dtype == torch.int8
    assert int(q.min()) >= -128 and int(q.max()) <= 128 - 2**frac
    err = (from_fixed_point8(q, bits) - x.clamp(qmin, qmax)).abs().max()
    assert err <= 2.0 ** -(frac + 1)


def test_q44_values():
    x = torch.tensor([2.3, -9.0, 7.9, 0.03125, -0.5])
    q = to_fixed_point8(x, 4)
    assert q.tolist() == [37, -128, 112, 0, -8]  # 0.5 ulp rounds half to even
    assert from_fixed_point8(q, 4).tolist() == [2.3125, -8.0, 7.0, 0.0, -0.5]
    with pytest.raises(ValueError, match="bits <= 7"):
        to_fixed_point8(x, 8)
    with pytest.raises(LowbitError, match="--phi int"):
        LRQATConfig(bits=8)


def _l4_error(w, s, bits):
    qmin, qmax = grid_range(bits)
    d = torch.clamp(torch.round(w / s), qmin, qmax) * s - w
    d = d * d
    return (d * d).sum(-1)


@pytest.mark.parametrize("group_size", [-1, 32])
def test_lp_search_beats_minmax(group_size):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((24, 128)) * 0.02
    w[3] = 0
    grid = IntGrid(4, group_size, True)
    s = lp_scales(w, grid)
    n = grid.num_groups(128)
    assert s.shape == (24, n) and torch.equal(s, s.half().float())
    assert torch.all(s[3] == 1.0)
    g = grid.group_width(128)
    wg = w.view(24, n, g)
    minmax = (wg.abs().amax(-1) / 7).half().float().clamp(min=2**-24)
    minmax = torch.where(minmax == 0, torch.ones_like(minmax), minmax)
    lp_err, mm_err = _l4_error(wg, s[..., None], 4), _l4_error(wg, minmax[..., None], 4)
    assert torch.all(lp_err <= mm_err) and torch.any(lp_err < mm_err)
    assert torch.any(s < minmax)  # heavy tails: the L^4 optimum clips some groups


def test_lp_search_ignores_ragged_padding():
    w = torch.randn(8, 100)
    s = lp_scales(w, IntGrid(3, 32, True))
    assert s.shape == (8, 4)
    assert torch.equal(s[:, 3], lp_scales(w[:, 96:], IntGrid(3, -1, True))[:, 0])


# --- the layers -----------------------------------------------------------------------------


def test_only_lowrank_and_scales_get_gradients():
    cfg = config()
    model, _, layers = prepared(cfg)
    assert len(layers) == 2 * 7 and all(isinstance(m, LRQATLinear) for m in layers.values())
    assert all(m.phi0.dtype == torch.int8 for m in layers.values())  # Q3.5 fixed point
    ids = torch.randint(0, VOCAB, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    want = {f"{n}.{k}" for n in layers for k in ("lora_a", "lora_b", "scale")}
    assert with_grad == trainable == want
    for layer in layers.values():
        assert layer.lora_a.grad.abs().sum() > 0 and layer.scale.grad.abs().sum() > 0
    assert not any("weight" in n for n in trainable)


def test_round_and_scales_are_straight_through():
    torch.manual_seed(0)
    grid = IntGrid(3, 4, True)
    z0 = torch.randn(6, 8) * 4  # some beyond [-4, 3]: no gradient there
    s0 = torch.rand(6, 2) * 0.1 + 0.01
    layer = LRQATLinear(z0, "fp32", s0, grid, rank=2, alpha=2.0)
    with torch.no_grad():
        layer.lora_a.normal_()
    g = torch.randn(6, 8)
    (layer.weight_hat() * g).sum().backward()
    with torch.no_grad():
        z = layer.ratio()
        torch.testing.assert_close(z, z0 + layer.lora_a @ layer.lora_b)  # alpha / rank = 1
        ints = torch.round(z)
        inside = (ints >= -4) & (ints <= 3)
        s = expand_groups(layer.effective_scale(), 4, 8)
        dz = g * s * inside
        assert torch.equal(layer.integers(), ints.clamp(-4, 3))
        assert torch.equal(layer.weight_hat(), s * ints.clamp(-4, 3))
    torch.testing.assert_close(layer.lora_a.grad, dz @ layer.lora_b.T)
    torch.testing.assert_close(layer.lora_b.grad, layer.lora_a.T @ dz)
    ds = (g * ints.clamp(-4, 3)).view(6, 2, 4).sum(-1)
    torch.testing.assert_close(layer.scale.grad, ds)


@pytest.mark.parametrize("group", [-1, 4, 3])  # per channel, even groups, ragged groups
def test_fused_fake_quant_matches_autograd_reference(group):
    torch.manual_seed(1)
    z = (torch.randn(5, 10) * 5).requires_grad_()
    n = IntGrid(4, group, True).num_groups(10)
    width = 10 if group == -1 else group
    s = (torch.rand(5, n) + 0.5).requires_grad_()
    g = torch.randn(5, 10)
    got = FakeQuantSTE.apply(z, s, -8, 7, width)
    (got * g).sum().backward()
    got_grads = z.grad.clone(), s.grad.clone()
    z.grad = s.grad = None
    ref = expand_groups(s, width, 10) * torch.clamp(z + (torch.round(z) - z).detach(), -8, 7)
    (ref * g).sum().backward()
    assert torch.equal(got, ref)
    torch.testing.assert_close(got_grads[0], z.grad)
    torch.testing.assert_close(got_grads[1], s.grad)
    assert (got_grads[0] == 0).any() and (got_grads[0] != 0).any()  # the clamp cuts some


def test_full_qat_weight_gradient_is_straight_through():
    torch.manual_seed(0)
    w = torch.randn(6, 8) * 0.1
    s0 = torch.full((6, 1), 0.02)
    layer = QATLinear(w, s0, IntGrid(4, -1, True))
    g = torch.randn(6, 8)
    (layer.weight_hat() * g).sum().backward()
    r = torch.round(w / layer.effective_scale().detach())
    torch.testing.assert_close(layer.weight.grad, g * ((r >= -8) & (r <= 7)))
    assert layer.scale.grad is not None


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, warmup=2, total=10) for s in range(10)]
    assert f[:3] == [0.5, 1.0, 1.0] and f[-1] == 1 / 8 and all(x > 0 for x in f)
    assert all(a >= b for a, b in zip(f[1:], f[2:], strict=False))


def test_config_errors_name_the_fix():
    with pytest.raises(LowbitError, match="drop --asym"):
        LRQATConfig(symmetric=False)
    with pytest.raises(LowbitError, match="--init"):
        LRQATConfig(init="awq")
    with pytest.raises(LowbitError, match="--phi"):
        LRQATConfig(phi="int4")
    with pytest.raises(LowbitError, match="unknown key 'rnak'"):
        LRQATConfig.from_dict({"rnak": 8})


# --- training, merge, resume ------------------------------------------------------------------


@pytest.mark.parametrize("full_qat", [False, True])
def test_merge_reproduces_the_trained_forward(full_qat):
    cfg = config(full_qat=full_qat)
    model, layers, facts, ints0 = run(cfg)
    assert len(facts["losses"]) == cfg.steps
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        ints = {n: m.integers().clone() for n, m in layers.items()}
        w_hat = {n: m.weight_hat().clone() for n, m in layers.items()}
        want = model(ids).logits
    assert sum(int((ints[n] != ints0[n]).sum()) for n in layers) > 0  # training moved integers
    merge(model, layers, {n: m.effective_scale().detach() for n, m in layers.items()})
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(quant) == set(layers)
    for name, q in quant.items():
        stored = q.stored_weight()
        assert torch.equal(stored.codes().float() - 4, ints[name])  # exactly the forward's
        assert torch.equal(q.dequantized_weight(), w_hat[name])
    assert not any(p.requires_grad for p in model.parameters())
    assert not any("lora" in k or k.endswith(".phi0") for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_resume_continues_to_identical_trainables(tmp_path):
    cfg = config(steps=6, checkpoint_every=2)
    full_model, _, full_facts, _ = run(cfg, CheckpointStore(tmp_path / "full"))

    class Killed(Exception):
        pass

    class DiesAfterStep4(CheckpointStore):
        def save(self, state):
            super().save(state)
            if state["step"] == 4:
                raise Killed

    with pytest.raises(Killed):
        run(cfg, DiesAfterStep4(tmp_path / "cut"))
    with pytest.raises(LowbitError, match="pass --resume"):
        run(cfg, CheckpointStore(tmp_path / "cut"))
    other = CheckpointStore(tmp_path / "ptq", resume=True)
    other.save({"kind": "ptq", "version": 1})
    with pytest.raises(LowbitError, match="another kind of run"):
        run(cfg, other)
    with pytest.raises(LowbitError, match="lr=0.01"):
        run(dataclasses.replace(cfg, lr=0.02), CheckpointStore(tmp_path / "cut", resume=True))
    resumed, _, facts, _ = run(cfg, CheckpointStore(tmp_path / "cut", resume=True))
    assert facts["resumed_from_step"] == 4 and len(facts["losses"]) == 6
    assert facts["losses"] == full_facts["losses"]
    want = {n: p for n, p in full_model.named_parameters() if p.requires_grad}
    got = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert want.keys() == got.keys() and len(want) == 3 * 14
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_training_reports_memory_and_time():
    lr_facts = run(config(steps=2))[2]
    full_facts = run(config(steps=2, full_qat=True))[2]
    for facts in (lr_facts, full_facts):
        assert facts["sec_per_step"] > 0 and facts["peak_rss_mb"] > 0 and facts["tokens"] == 64
    lr_mem, full_mem = lr_facts["state_mb"], full_facts["state_mb"]
    assert lr_mem["trainables"] < full_mem["trainables"]
    assert lr_mem["optimizer"] == pytest.approx(2 * lr_mem["trainables"], rel=0.01)
    assert full_mem["frozen_linear_weights"] == 0  # full QAT keeps nothing frozen but biases
