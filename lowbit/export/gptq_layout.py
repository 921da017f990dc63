"""Export a lowbit DIR of integer weights to the GPTQ (AutoGPTQ) checkpoint layout.

Per quantized linear ``NAME`` with ``R`` outputs, ``C`` inputs, ``b`` bits (``pf = 32 / b``
codes per int32) and ``n = ceil(C / G)`` groups:

- ``NAME.qweight``: int32 ``[C / pf, R]``; code of input ``i``, output ``j`` sits in word
  ``[i // pf, j]`` at bits ``[b * (i % pf), b * (i % pf) + b)`` (packed along the input dim);
- ``NAME.qzeros``: int32 ``[n, R / pf]``; zero of group ``g``, output ``j`` in word
  ``[g, j // pf]`` at bits ``b * (j % pf)``, stored **minus one** (below);
- ``NAME.scales``: fp16 ``[n, R]``;
- ``NAME.g_idx``: int32 ``[C]``, the group of each input column: ``i // G`` in input order,
  or, with an act-order permutation ``perm`` (stored column ``k`` is input ``perm[k]``),
  ``g_idx[perm[k]] = k // G``;
- ``NAME.bias`` when the layer has one.

``W[j, i] = scales[g_idx[i], j] * (q[i, j] - (qzeros[g_idx[i], j] + 1))``.

Zero-point convention: this writes the original AutoGPTQ layout (``checkpoint_format: "gptq"``,
"v1"), whose kernels add 1 to every stored zero, so the stored value is ``z - 1`` (a symmetric
4-bit zero 8 is stored as 7: words ``0x77777777``). GPTQModel's ``gptq_v2`` stores ``z``
itself; v1 cannot store ``z = 0`` (it would wrap to ``2^b - 1``), so a layer with a zero code
of 0 is refused rather than silently changed. ``quantize_config.json`` and ``config.json``'s
``quantization_config`` carry ``bits``, ``group_size``, ``desc_act``, ``sym``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.export import hf_folder
from lowbit.export.provenance import CONFIG_KEY, provenance
from lowbit.formats.packed_int import PackedIntWeight
from lowbit.nn.quant_linear import QuantLinear

TARGET = "gptq"
GPTQ_BITS = (2, 4, 8)
EXPRESSIBLE = (
    "weight-only INT2/INT4/INT8 from rtn or gptq (group or channel, sym or asym with integer "
    "zeros, act-order included), one bits/group/sym setting for all layers (SpQR: use "
    "--format spqr)"
)


def _refuse(name: str, what: str) -> LowbitError:
    return LowbitError(hf_folder.refusal(name, what, "the GPTQ layout", EXPRESSIBLE))


def pack_along_dim0(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[K / pf, N]`` from codes ``[K, N]`` (``pf = 32 / bits``, ``K % pf == 0``):
    code ``[k, n]`` at bits ``bits * (k % pf)`` of word ``[k // pf, n]``."""
    pf = 32 // bits
    k, n = codes.shape
    c = codes.to(torch.int64).view(k // pf, pf, n)
    shifts = (torch.arange(pf, dtype=torch.int64) * bits).view(1, pf, 1)
    words = (c << shifts).sum(dim=1)  # in [0, 2^32): reinterpret as two's complement int32
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def g_idx(in_features: int, group: int, perm: torch.Tensor | None) -> torch.Tensor:
    """int32 ``[C]``: the group of each input column (see the module docstring)."""
    stored_group = torch.arange(in_features, dtype=torch.int32) // group
    if perm is None:
        return stored_group
    out = torch.empty(in_features, dtype=torch.int32)
    out[perm.long()] = stored_group
    return out


def layer_tensors(name: str, q: QuantLinear) -> dict[str, torch.Tensor]:
    """GPTQ tensors of one quantized linear (names relative to the layer)."""
    if q.lowrank is not None or q.act_quant is not None or q.reassembly is not None:
        raise _refuse(name, "LoRC factors / activation quantization / channel reassembly")
    w = q.stored_weight()
    if not isinstance(w, PackedIntWeight):
        raise _refuse(name, f"stored weight kind '{w.kind}'")
    grid, rows, cols = w.grid, w.out_features, w.in_features
    if grid.bits not in GPTQ_BITS:
        raise _refuse(name, f"{grid.bits}-bit weights (AutoGPTQ packs {GPTQ_BITS} bits "
                      "uniformly; 3-bit uses an interleaved layout lowbit does not write)")
    pf = 32 // grid.bits
    if cols % pf or rows % pf:
        raise _refuse(name, f"shape [{rows}, {cols}] (both must be multiples of {pf})")
    if not grid.symmetric and not grid.round_zero:
        raise _refuse(name, "real-valued (unrounded) zero points")
    zeros = w.zero_points().round().to(torch.int64)  # [R, n]
    if int(zeros.min()) < 1:
        raise _refuse(name, "a zero code of 0 (the v1 zero-minus-one convention cannot hold it)")
    group = grid.group_width(cols)
    codes = w.codes()  # [R, C] in stored column order
    if w.perm is not None:
        codes = codes[:, torch.argsort(w.perm.long())]  # back to input order
    return {
        "qweight": pack_along_dim0(codes.t().contiguous(), grid.bits),
        "qzeros": pack_along_dim0(zeros - 1, grid.bits).t().contiguous(),
        "scales": w.scales.t().contiguous().to(torch.float16),
        "g_idx": g_idx(cols, group, w.perm),
    }


def _quantize_config(layers: dict[str, QuantLinear], manifest: dict) -> dict:
    grids = {name: q.stored_weight().grid for name, q in layers.items()}
    settings = {(g.bits, g.group_size, g.symmetric) for g in grids.values()}
    if len(settings) != 1:
        raise LowbitError(f"layers use different bits/group/sym settings {sorted(settings)}; "
                          f"the GPTQ config is global. Exportable: {EXPRESSIBLE}")
    bits, group_size, sym = settings.pop()
    recipe = (manifest.get("recipe") or [{}])[0]
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": any(q.stored_weight().perm is not None for q in layers.values()),
        "sym": sym,
        # recipes record every field; one without the key predates GPTQ's static-groups
        # default (and meant dynamic groups), or is another method's (no groups to order)
        "static_groups": bool(recipe.get("static_groups", False)),
        "true_sequential": bool(recipe.get("true_sequential", False)),
        "damp_percent": recipe.get("percdamp", 0.01),
        "model_file_base_name": "model",
    }


def export_gptq(src: str | Path, out: str | Path) -> Path:
    """Write lowbit DIR ``src`` in the GPTQ layout to ``out`` (nothing written on refusal)."""
    src, out, model, manifest, layers = hf_folder.load_source(src, out)
    per_layer = {name: layer_tensors(name, q) for name, q in layers.items()}
    config = _quantize_config(layers, manifest)
    tensors = hf_folder.export_tensors(src, per_layer, model)
    record = provenance(src, manifest, TARGET)
    extra = {"quantize_config.json": json.dumps({**config, CONFIG_KEY: record}, indent=2)}
    return hf_folder.write_export(src, out, tensors, config, record, extra)
