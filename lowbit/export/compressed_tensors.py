"""Export a lowbit DIR to the compressed-tensors checkpoint layout (transformers, vLLM, SGLang).

Each quantized linear ``NAME`` becomes the tensors compressed-tensors stores for its scheme,
and ``config.json`` gets ``quantization_config = {"quant_method": "compressed-tensors",
"format", "config_groups", "ignore", ...}``. What maps, exactly (the exported model computes
the same values as the lowbit DIR):

=====================================  =========================  ==============================
lowbit stored weight (+ activations)   compressed-tensors format  tensors per layer
=====================================  =========================  ==============================
int grid, 4 or 8 bits, integer zeros,  ``pack-quantized``         ``weight_packed`` int32
group G | channel, sym | asym, no                                 ``[R, ceil(C*b/32)]``,
act-order permutation                                             ``weight_scale`` ``[R, n]``,
                                                                  ``weight_zero_point`` (asym)
                                                                  int32 ``[ceil(R*b/32), n]``,
                                                                  ``weight_shape`` ``[2]``
block fp8_e4m3 elements, float scale   ``float-quantized``        ``weight`` float8_e4m3fn
(amax rule), tensor | channel | group                             ``[R, C]``, ``weight_scale``
NVFP4 (fp4_e2m1, G=16, fp8 scales,     ``nvfp4-pack-quantized``   ``weight_packed`` uint8
global tensor scale)                                              ``[R, C/2]``, ``weight_scale``
                                                                  fp8 ``[R, C/16]``,
                                                                  ``weight_global_scale`` ``[1]``
MX-scaled FP4 (fp4_e2m1, G=32, e8m0)   ``mxfp4-pack-quantized``   ``weight_packed``,
                                                                  ``weight_scale`` uint8 codes
int8 sym weights + int8 activations    ``int-quantized``          ``weight`` int8 ``[R, C]``
(W8A8 INT8, SmoothQuant's format)                                 (``u - 128``),
                                                                  ``weight_scale`` fp32
                                                                  ``[R, n]``
int4 sym weights + int8 activations    ``pack-quantized``         as the int rows above
+ fp8_e4m3 / int8 (symmetric)          ``input_activations``      (dynamic: nothing stored)
activations, per token
+ fp8_e4m3 / int8 (symmetric)          ``input_activations``      ``input_scale`` ``[1]``
activations, per tensor (static)
=====================================  =========================  ==============================

INT8 activations mean what vLLM computes: ``x_q = clamp(round(x / s), -128, 127)`` with
``s = amax(|x_t|) / 127`` per token (dynamic) or the stored ``input_scale`` (static), lowbit's
:class:`~lowbit.nn.act_quant.ActQuantizer` exactly. (compressed-tensors' own fake-quant forward,
which transformers runs, computes a dynamic int8 scale as ``amax / 127.5``; a static scale is
used as stored by every engine.)

Integer codes: lowbit stores ``u`` in ``[0, 2^b)`` with value ``s * (u - z)``;
compressed-tensors quantizes to signed ``q = u - 2^(b-1)`` with ``zp = z - 2^(b-1)`` and packs
``q + 2^(b-1)``, i.e. the same ``u`` (and ``z``), densely little-endian into int32 words.

Refused, with the reason (:class:`~lowbit.errors.LowbitError`): SpQR weights (outliers, bilevel
statistics), LoRC low-rank factors, act-order permutations, real-valued zeros, ragged groups,
other bit widths, M1/M2 scales other than MX FP4, FP8-E5M2 activations, and INT8 activations
that are asymmetric or read asymmetric or non-integer weights (no engine kernel takes them; see
:func:`layer_scheme`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export import hf_folder
from lowbit.export.provenance import provenance
from lowbit.formats.granularity import Group, PerTensor
from lowbit.formats.packed_block import PackedBlockWeight
from lowbit.formats.packed_int import PackedIntWeight
from lowbit.formats.packing import pack_codes
from lowbit.nn.quant_linear import QuantLinear

TARGET = "compressed-tensors"
EXPRESSIBLE = (
    "INT4/INT8 weights (rtn, gptq without act-order permutation, zqfp int) group or channel, "
    "sym or asym; FP8-E4M3 weights with float scales (zqfp fp8); NVFP4; MXFP4; optionally with "
    "FP8-E4M3 activations, or symmetric INT8 activations on sym INT weights (W8A8 INT8), per "
    "token (dynamic) or per tensor (static)"
)
PACKED_INT_BITS = (4, 8)
_SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NotExpressible(LowbitError):
    """A lowbit layer that compressed-tensors cannot represent exactly."""


@dataclass(frozen=True)
class CTLayer:
    """One linear in compressed-tensors form.

    Attributes:
        scheme: JSON of a compressed-tensors ``QuantizationScheme`` (``weights``,
            ``input_activations``, ``format``), without ``targets``.
        tensors: stored tensors by name relative to the layer (``weight_packed``, ...).
    """

    scheme: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(hash=False, compare=False)


def _refuse(name: str, what: str) -> NotExpressible:
    return NotExpressible(hf_folder.refusal(name, what, "compressed-tensors", EXPRESSIBLE))


def pack_int32_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Dense little-endian packing of each row of codes into int32 words.

    Args:
        codes: ``[R, C]`` integer codes in ``[0, 2^bits)``.
    Returns:
        int32 ``[R, ceil(C*bits/32)]``: code ``j`` of a row occupies bits
        ``[j*bits, (j+1)*bits)`` of the row's little-endian bit stream.
    """
    rows, cols = codes.shape
    pad = (-cols) % 32  # 32 codes fill exactly `bits` words
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, pad))
    words = pack_codes(padded, bits).view(rows, -1).view(torch.int32)
    return words[:, : -(-cols * bits // 32)].contiguous()


def _int_layer(name: str, w: PackedIntWeight) -> tuple[dict, dict[str, torch.Tensor]]:
    grid = w.grid
    if w.perm is not None:
        raise _refuse(name, "its act-order column permutation (g_idx) is stored; re-quantize "
                      "without --no-static-groups (static groups are GPTQ's default) or with "
                      "--no-act-order, or export with --format gptq (desc_act)")
    if grid.bits not in PACKED_INT_BITS:
        raise _refuse(name, f"{grid.bits}-bit integer weights (packed layouts agree across "
                      f"versions and engines only for {PACKED_INT_BITS} bits)")
    if not grid.symmetric and not grid.round_zero:
        raise _refuse(name, "real-valued (unrounded) zero points")
    cols = w.in_features
    group = grid.granularity.size if isinstance(grid.granularity, Group) else None
    if group is not None and cols % group:
        raise _refuse(name, f"a ragged last group ({cols} columns, group {group})")
    args = {
        "num_bits": grid.bits,
        "type": "int",
        "symmetric": grid.symmetric,
        "strategy": "channel" if group is None else "group",
        "group_size": group,
        "dynamic": False,
        "actorder": None,
    }
    tensors = {
        "weight_packed": pack_int32_rows(w.codes(), grid.bits),
        "weight_scale": w.scales.clone(),
        "weight_shape": torch.tensor([w.out_features, cols], dtype=torch.int64),
    }
    if not grid.symmetric:
        zeros = w.zero_points().round().to(torch.int64)  # [R, n] codes z
        tensors["weight_zero_point"] = pack_int32_rows(zeros.t(), grid.bits).t().contiguous()
    return args, tensors


def _block_layer(
    name: str, w: PackedBlockWeight
) -> tuple[dict, dict[str, torch.Tensor], str]:
    cfg = w.config
    rows, cols = w.out_features, w.in_features
    scales = w.block_scales()
    float_scale = cfg.scale_format in _SCALE_DTYPES
    group = cfg.granularity.size if isinstance(cfg.granularity, Group) else None
    if cfg.element == "fp8_e4m3" and cfg.scale_rule == "amax" and float_scale:
        if group is not None and cols % group:
            raise _refuse(name, f"a ragged last group ({cols} columns, group {group})")
        strategy = "tensor" if isinstance(cfg.granularity, PerTensor) else (
            "channel" if group is None else "group")
        args = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy,
                "group_size": group, "dynamic": False}
        scale = scales.effective().to(_SCALE_DTYPES[cfg.scale_format])
        tensors = {"weight": w.codes().view(torch.float8_e4m3fn),
                   "weight_scale": scale.reshape(1) if strategy == "tensor" else scale}
        return args, tensors, "float-quantized"
    if cfg.element == "fp4_e2m1" and cols % 2 == 0:
        packed = w.qweight.view(rows, cols // 2)  # two codes a byte, first in the low nibble
        if (group, cfg.scale_format, cfg.scale_rule, cfg.tensor_scale) == (
            16, "fp8_e4m3", "amax", True
        ):
            args = {"num_bits": 4, "type": "float", "symmetric": True, "dynamic": False,
                    "strategy": "tensor_group", "group_size": 16,
                    "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": "torch.float8_e4m3fn"}
            tensors = {"weight_packed": packed, "weight_scale": w.scales.view(torch.float8_e4m3fn),
                       "weight_global_scale": w.tensor_scale.float().reshape(1)}
            return args, tensors, "nvfp4-pack-quantized"
        if (group, cfg.scale_format) == (32, "e8m0") and cfg.scale_rule in ("mx", "m1"):
            args = {"num_bits": 4, "type": "float", "symmetric": True, "dynamic": False,
                    "strategy": "group", "group_size": 32,
                    "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"}
            return args, {"weight_packed": packed, "weight_scale": w.scales.clone()}, (
                "mxfp4-pack-quantized"
            )
    raise _refuse(
        name,
        f"block-scaled {cfg.element} weights {cfg.granularity.describe()}, {cfg.scale_format} "
        f"scales by rule '{cfg.scale_rule}'" + (" and a tensor scale" if cfg.tensor_scale else "")
        + "; zqfp exports with --weight-format int4 or int8 (W4A8 / W8A8), --weight-format "
        "fp8_e4m3, or FP4 as MXFP4 (--scale-constraint m1 -g 32)",
    )


ACT_FORMATS = {"fp8_e4m3": "float", "int8": "int"}


def _act_args(name: str, q: QuantLinear) -> tuple[dict | None, dict[str, torch.Tensor]]:
    act = q.act_quant
    if act is None:
        return None, {}
    if act.fmt not in ACT_FORMATS:
        raise _refuse(name, f"{act.fmt} activations (compressed-tensors' activations are "
                      "fp8_e4m3 or int8)")
    if not act.symmetric:
        raise _refuse(name, f"asymmetric {act.fmt} activations (vLLM takes a per-token zero "
                      "point from the token's own min/max, lowbit's range always holds 0); "
                      "re-quantize with --act-symmetric")
    args = {"num_bits": 8, "type": ACT_FORMATS[act.fmt], "symmetric": True}
    if act.granularity == "token":
        return {**args, "strategy": "token", "dynamic": True, "observer": None}, {}
    return {**args, "strategy": "tensor", "dynamic": False}, {"input_scale": act.scale.float()}


def _int8_activation_weights(name: str, stored: object) -> None:
    """INT8 activations run on integer kernels (vLLM's W8A8 / W4A8 int8), which take
    symmetric integer weights only."""
    if not isinstance(stored, PackedIntWeight):
        raise _refuse(name, f"INT8 activations with {stored.kind} weights (int8 activation "
                      "kernels take integer weights); use --act-format fp8_e4m3")
    if not stored.grid.symmetric:
        raise _refuse(name, "INT8 activations with asymmetric weights (vLLM's int8 kernels take "
                      "symmetric weights); re-quantize with --sym")


def _int_quantized(w: PackedIntWeight, args: dict) -> tuple[dict, dict[str, torch.Tensor], str]:
    """8-bit symmetric weights unpacked, as ``int-quantized`` (the W8A8 INT8 layout): signed
    int8 ``q = u - 128`` ``[R, C]`` and the scales widened to fp32 (the dtype vLLM's int8
    kernels take them in; a loader that dequantizes in the scale's dtype stays exact)."""
    q = (w.codes().to(torch.int16) - 128).to(torch.int8)
    return args, {"weight": q, "weight_scale": w.scales.float()}, "int-quantized"


def layer_scheme(name: str, q: QuantLinear) -> CTLayer:
    """The compressed-tensors form of one quantized linear, or :class:`NotExpressible`."""
    if q.lowrank is not None:
        raise _refuse(name, "LoRC low-rank factors are added to its output")
    if q.reassembly is not None:
        raise _refuse(name, "QLLM channel reassembly gathers its input channels")
    stored = q.stored_weight()
    act, act_tensors = _act_args(name, q)
    if act is not None and act["type"] == "int":
        _int8_activation_weights(name, stored)
    if isinstance(stored, PackedIntWeight):
        weights, tensors = _int_layer(name, stored)
        fmt = "pack-quantized"
        if act is not None and act["type"] == "int" and stored.grid.bits == 8:
            weights, tensors, fmt = _int_quantized(stored, weights)
    elif isinstance(stored, PackedBlockWeight):
        weights, tensors, fmt = _block_layer(name, stored)
    else:
        raise _refuse(name, f"stored weight kind '{stored.kind}' (SpQR outliers and bilevel "
                      "statistics have no compressed-tensors layout; 3-bit 16x16 SpQR exports "
                      "losslessly with --format spqr)")
    scheme = {"weights": weights, "input_activations": act, "output_activations": None,
              "format": fmt}
    return CTLayer(scheme, {**tensors, **act_tensors})


def _config_groups(model: nn.Module, layers: dict[str, CTLayer]) -> tuple[dict, list[str], str]:
    """(config_groups, ignore, summary format): one group per distinct scheme. A single scheme
    targets ``Linear`` and ignores every other linear (the LM head, layers left in float);
    several schemes target their layers by exact name."""
    groups: dict[str, dict] = {}
    for name, layer in layers.items():
        key = json.dumps(layer.scheme, sort_keys=True)
        groups.setdefault(key, {**layer.scheme, "targets": []})["targets"].append(name)
    formats = sorted({g["format"] for g in groups.values()})
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | QuantLinear)]
    ignore = [n for n in linears if n not in layers]
    if len(groups) == 1:
        only = next(iter(groups.values()))
        only["targets"] = ["Linear"]
    else:
        ignore = [n for n in ignore if n == "lm_head"]
    config_groups = {f"group_{i}": g for i, g in enumerate(groups.values())}
    return config_groups, ignore, formats[0] if len(formats) == 1 else "mixed-precision"


def export_compressed_tensors(src: str | Path, out: str | Path) -> Path:
    """Write lowbit DIR ``src`` as a compressed-tensors checkpoint folder ``out``.

    Raises :class:`NotExpressible` (a LowbitError) naming the first layer that has no exact
    compressed-tensors form; nothing is written then.
    """
    src, out, model, manifest, quantized = hf_folder.load_source(src, out)
    layers = {name: layer_scheme(name, q) for name, q in quantized.items()}
    config_groups, ignore, fmt = _config_groups(model, layers)
    tensors = hf_folder.export_tensors(src, {n: layer.tensors for n, layer in layers.items()},
                                      model)
    quantization_config = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    record = provenance(src, manifest, TARGET)
    return hf_folder.write_export(src, out, tensors, quantization_config, record)
