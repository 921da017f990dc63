"""Helpers for the export tests: lowbit DIRs built directly from a small real model (no
calibration pass), and logit comparisons."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from lowbit.export.lowbit_format import save_quantized
from lowbit.formats.blockscale import preset
from lowbit.formats.intq import IntGrid, rtn_quantize
from lowbit.formats.packed_block import PackedBlockWeight
from lowbit.formats.packed_int import PackedIntWeight
from lowbit.models.arch import set_submodule
from lowbit.nn.act_quant import ActQuantizer
from lowbit.nn.quant_linear import QuantLinear

# a fixed prompt of SmolLM2 token ids (BOS first)
IDS = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 11, 260, 2012, 30, 42, 7, 99, 1110, 13]])

WeightFn = Callable[[torch.Tensor], object]


def int_weight(bits: int, group: int, symmetric: bool) -> WeightFn:
    grid = IntGrid(bits, group, symmetric)
    return lambda w: PackedIntWeight.from_codes(*rtn_quantize(w, grid), grid)


def block_weight(name: str) -> WeightFn:
    return lambda w: PackedBlockWeight.quantize(w, preset(name))


def fp8_channel_weight() -> WeightFn:
    from lowbit.formats.blockscale import BlockScaledConfig

    cfg = BlockScaledConfig("fp8_e4m3", -1, "fp16", "amax")
    return lambda w: PackedBlockWeight.quantize(w, cfg)


def build_dir(
    src: Path,
    out: Path,
    weight: WeightFn | dict[str, WeightFn],
    act: Callable[[str], ActQuantizer | None] = lambda name: None,
    method: str = "test",
) -> Path:
    """Quantize every decoder-block linear of HF folder ``src`` (``weight``: one function,
    or a function per name suffix like ``"q_proj"``) and save it as lowbit DIR ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            fn = weight if callable(weight) else weight[name.rsplit(".", 1)[1]]
            stored = fn(mod.weight.detach())
            set_submodule(model, name, QuantLinear(stored, mod.bias, act(name)))
    manifest = {"method": method, "lowbit_version": "0.1.0",
                "recipe": [{"method": method}], "source_model": str(src)}
    return save_quantized(model, AutoTokenizer.from_pretrained(src), out, manifest)


def plain_model(out: Path, state: dict[str, torch.Tensor]):
    """A plain fp32 transformers model of export ``out``'s config (quantization config
    dropped) holding ``state`` (decoded ``NAME.weight`` tensors and the float ones), in eval."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    model.tie_weights()
    return model.eval()


def hf_model(path: Path, dequantize: bool):
    """Export ``path`` loaded by transformers in fp32: its default compressed-tensors path, or
    compressed-tensors' decompression to dense weights (``dequantize``)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits.float()


def rel_err(ref: torch.Tensor, other: torch.Tensor) -> float:
    """max |ref - other| / max |ref|."""
    return float((ref - other).abs().max() / ref.abs().max())


def assert_same_logits(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor | None = None):
    """Two causal LMs give bit-identical logits on ``ids`` ``[1, T]`` (a short default)."""
    ids = torch.tensor([[1, 2, 3, 4, 5, 600, 700]]) if ids is None else ids
    with torch.inference_mode():
        assert torch.equal(a(ids).logits, b(ids).logits)
