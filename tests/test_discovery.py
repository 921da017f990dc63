"""Block structure found from tiny random models of many architectures (no download): the
block list, linear-like modules, compute order, shared inputs, norm feeds and gain offsets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.models.arch import BlockTable
from lowbit.models.convert import linear_layout
from lowbit.models.discovery import discover, find_structure, norm_gain_offset
from lowbit.models.experts import expert_modules, unfuse_experts
from lowbit.models.tiny import tiny_model

LLAMA_SEQ = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


# The tables lowbit had written by hand before discovery (lowbit/models/arch.py until #19).
_LLAMA = BlockTable(
    blocks="model.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    norm_feeds=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    row_feeds=(("mlp.up_proj", ("mlp.down_proj",)),),  # smoothquant.py's PRODUCERS until #19
)

_GEMMA3 = BlockTable(
    blocks="model.layers",
    sequential=_LLAMA.sequential,
    norm_feeds=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    norm_gain_offset=1.0,
    row_feeds=_LLAMA.row_feeds,
)

_OPT = BlockTable(
    blocks="model.decoder.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    norm_feeds=(
        ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("final_layer_norm", ("fc1",)),
    ),
    # fc1 through a ReLU (PRODUCERS until #19); v_proj is new: OPT has a value head per query head
    row_feeds=(("self_attn.v_proj", ("self_attn.out_proj",)), ("fc1", ("fc2",))),
)
TABLES = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gemma3_text": _GEMMA3, "opt": _OPT}


@pytest.mark.parametrize("model_type", sorted(TABLES))
def test_discovery_equals_the_hand_written_tables(model_type):
    assert discover(tiny_model(model_type)) == TABLES[model_type]


@pytest.mark.parametrize("model_type", ["qwen3", "granite", "smollm3"])
def test_llama_like_blocks(model_type):
    table = discover(tiny_model(model_type))
    assert table.blocks == "model.layers" and table.sequential == LLAMA_SEQ
    assert table.norm_feeds == (
        ("input_layernorm", QKV), ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
    )
    assert table.norm_gain_offset == 0.0


def test_gemma2_norms_multiply_by_one_plus_w():
    table = discover(tiny_model("gemma2"))
    assert table.norm_gain_offset == 1.0
    feeding = [name for name, _ in table.norm_feeds]
    assert feeding == ["input_layernorm", "pre_feedforward_layernorm"]


@pytest.mark.parametrize("model_type,qkv,up", [
    ("phi3", "self_attn.qkv_proj", "mlp.gate_up_proj"),
    ("gpt_neox", "attention.query_key_value", "mlp.dense_h_to_4h"),
])
def test_fused_projections_are_one_linear(model_type, qkv, up):
    table = discover(tiny_model(model_type))
    assert table.sequential[0] == (qkv,) and table.sequential[2] == (up,)


@pytest.mark.parametrize("model_type,group", [
    ("falcon", ("self_attention.query_key_value", "mlp.dense_h_to_4h")),
    ("cohere", (*QKV, "mlp.gate_proj", "mlp.up_proj")),
])
def test_parallel_attention_and_mlp_share_one_input(model_type, group):
    """Falcon (old layout) and Cohere feed one norm's output to attention and MLP at once."""
    table = discover(tiny_model(model_type))
    assert table.sequential[0] == group
    assert len(table.norm_feeds) == 1 and table.norm_feeds[0][1] == group


def test_post_norm_blocks_have_no_foldable_feed():
    """OLMo-2 normalises the outputs of attention and MLP: no norm feeds a linear directly,
    so smoothing and reassembly have nothing to fold into."""
    table = discover(tiny_model("olmo2"))
    assert table.sequential == LLAMA_SEQ and table.norm_feeds == ()


def test_gpt2_conv1d_is_linear_like():
    structure = find_structure(tiny_model("gpt2"))
    assert structure.blocks == "transformer.h"
    assert structure.linears == ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_fused_experts_are_found_and_routers_are_not_linears(model_type):
    model = tiny_model(model_type)
    structure = find_structure(model)
    assert structure.experts == ("mlp.experts",)
    assert not any(name.startswith("mlp.") for name in structure.linears)
    experts = model.get_submodule("model.layers.0.mlp.experts")
    assert experts.gate_up_proj.dim() == 3


class _SquaredGain(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight**2


def test_a_gain_that_is_not_affine_is_refused():
    assert norm_gain_offset(_SquaredGain(16), 16) is None
    assert norm_gain_offset(nn.LayerNorm(16), 16) == 0.0
    assert norm_gain_offset(nn.LayerNorm(16), 8) is None


def test_discovery_leaves_the_gains_as_they_were():
    model = tiny_model("gemma2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    discover(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_unfused_experts_compute_the_same_logits(model_type):
    model = tiny_model(model_type)
    ids = torch.arange(3, 67).reshape(2, 32)
    with torch.no_grad():
        want = model(ids).logits
        assert unfuse_experts(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
        assert torch.equal(model(ids).logits, want)
        experts = expert_modules(model)["model.layers.0.mlp.experts"]
        assert int(experts.routed_tokens.sum()) == 64 * 2  # top-2 of 4 experts per token
        for m in expert_modules(model).values():
            m.calibrate_all = True
        assert torch.equal(model(ids).logits, want)  # all experts run, routed ones still count


def test_unfused_experts_form_one_group_per_matrix():
    model = tiny_model("qwen3_moe", num_experts=8, num_experts_per_tok=1)
    unfuse_experts(model)
    table = discover(model, torch.arange(3, 6).reshape(1, 3))  # 3 tokens cannot reach 8 experts
    gate_up = tuple(f"mlp.experts.{e}.{m}" for e in range(8) for m in ("gate_proj", "up_proj"))
    down = tuple(f"mlp.experts.{e}.down_proj" for e in range(8))
    assert table.sequential == LLAMA_SEQ[:2] + (gate_up, down)
    assert not any(m.calibrate_all for m in expert_modules(model).values())


def test_gpt2_conv1d_becomes_linear_with_the_same_logits():
    model = tiny_model("gpt2")
    ids = torch.arange(3, 35).reshape(1, 32)
    with torch.no_grad():
        want = model(ids).logits
        replaced = linear_layout(model)
        assert replaced["experts"] == [] and len(replaced["conv1d"]) == 8
        assert torch.allclose(model(ids).logits, want, rtol=0, atol=1e-6)
    assert isinstance(model.get_submodule("transformer.h.0.attn.c_attn"), nn.Linear)
    assert discover(model).sequential[0] == ("attn.c_attn",)


def test_unfused_names_are_the_names_transformers_writes(tmp_path):
    from safetensors import safe_open

    from lowbit.models.tiny import save_tiny

    folder = save_tiny("qwen3_moe", tmp_path / "m")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    model = tiny_model("qwen3_moe")
    unfuse_experts(model)
    assert set(model.state_dict()) == on_disk


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "falcon", "starcoder2", "phi3", "glm4"])
def test_no_row_feed_through_gelu_or_a_fused_gate_up(model_type):
    """GELU MLPs (the activation is not positively homogeneous) and Phi-3/GLM-4's fused
    ``gate_up_proj`` (twice the width of down's input): nothing scales down's input exactly."""
    model = tiny_model(model_type)
    linear_layout(model)
    table = discover(model)
    assert table.row_feeds == ()
    assert table.producer_of(table.sequential[-1]) is None


def test_grouped_kv_heads_have_no_value_row_feed():
    """With fewer value heads than query heads ``v_proj`` is narrower than ``o_proj``'s input;
    with one per query head it scales it exactly."""
    grouped = discover(tiny_model("llama"))
    assert grouped.producer_of(("self_attn.o_proj",)) is None
    heads = tiny_model("llama").config.num_attention_heads
    full = discover(tiny_model("llama", num_key_value_heads=heads))
    assert full.producer_of(("self_attn.o_proj",)) == "self_attn.v_proj"


def test_row_feeds_are_found_in_bf16():
    """A bf16 load rounds the scaled and the plain paths differently; the probe still finds
    ``up_proj`` and still refuses ``gate_proj`` (SiLU of it is not linear)."""
    table = discover(tiny_model("llama").to(torch.bfloat16))
    assert table.row_feeds == (("mlp.up_proj", ("mlp.down_proj",)),)
