"""Export a lowbit DIR of SpQR weights to the layout of the transformers SpQR integration.

transformers (``quantization_config.quant_method = "spqr"``) replaces each converted
``nn.Linear`` by ``spqr_quant.QuantizedLinear`` (package ``spqr_quant`` 0.2.0, the authors'
CUDA inference kernel), which supports exactly 3-bit codes, 3-bit first-level statistics and
16 x 16 tiles (beta1 = beta2 = 16). Per converted linear ``NAME`` with ``R`` outputs and ``C``
inputs (both multiples of 16, ``n = C / 16`` tile columns):

- ``NAME.dense_weights``: int64 ``[R / 16 * n * 16]``, one 64-bit word per row of a 16 x 16
  tile, tiles in row-tile-major order: the word of row ``r``, tile column ``t`` sits at index
  ``(r // 16) * (n * 16) + t * 16 + r % 16``. Bits ``0-2``: first-level scale code, ``3-5``:
  first-level zero code, ``6 + 3 l`` (``l < 16``): the code of stored column ``16 t + l``,
  ``54-61``: byte ``(r % 16) // 2`` of the tile's second-level word, ``62-63``: zero. The
  second-level word is four fp16 numbers, low to high: scale of the scales ``s_s``, scale of
  the zeros ``z_s``, zero of the scales ``s_z``, zero of the zeros ``z_z`` (each byte is kept
  by two rows; the kernel ORs the rows' bytes back together).
- ``NAME.row_offsets``: int32 ``[R + 1]`` CSR row offsets of the outliers.
- ``NAME.col_vals``: int32 ``[nnz]``: bits ``0-15`` the outlier's *stored* column, bits
  ``16-31`` its fp16 value.
- ``NAME.in_perm``: int32 ``[C / 2]``: the input permutation as uint16 pairs, element ``k`` =
  ``perm[2k] | perm[2k + 1] << 16``; stored column ``j`` reads input ``perm[j]`` (the kernel
  gathers ``x[perm[j]]``). The identity when lowbit stored no permutation.

Effective weight, in stored column order (``g = c // 16``, row group ``h = r // 16``)::

    s[r, g] = s_s[h, g] * (qs[r, g] - s_z[h, g]);  z[r, g] = z_s[h, g] * (qz[r, g] - z_z[h, g])
    W[r, c] = s[r, g] * (q[r, c] - z[r, g]) + sum of outlier values at (r, c)

then ``W[:, perm[j]] = W_stored[:, j]``. This is lowbit's :class:`SpQRWeight` formula
term for term (lowbit's outliers are also corrections added to the dense value), so every
stored number is carried over unchanged: codes, 3-bit statistic codes, fp16 second-level
statistics, fp16 outlier values, CSR offsets, permutation. The conversion is lossless; a
decoder evaluating the formula in fp32 gets lowbit's weights bit for bit. The ``spqr_quant``
CUDA kernel evaluates it in fp16 arithmetic (each subtraction and product rounded to fp16),
so its weights differ from lowbit's fp32 ones by fp16 rounding (docs/EXPORT.md has the
measured error).

Refused (:class:`~lowbit.errors.LowbitError`, nothing written): any other weight kind or SpQR
setting, rows or columns not multiples of 16, more than 32768 columns (column ids are 16-bit,
read as signed by the kernel), biases (``QuantizedLinear`` has none), LoRC factors and
activation quantization.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export import hf_folder
from lowbit.export.provenance import provenance
from lowbit.formats.spqr_weight import SpQRWeight
from lowbit.models.convert import layout_of
from lowbit.nn.quant_linear import QuantLinear

TARGET = "spqr"
TILE = 16
BITS = 3
MAX_COLUMNS = 1 << 15
TENSORS = ("dense_weights", "row_offsets", "col_vals", "in_perm")
EXPRESSIBLE = (
    "SpQR (`lowbit quantize --method spqr`) with --bits 3, group_size (beta1) 16, beta2 16 and "
    "3-bit first-level scales and zeros (the defaults), on linears without bias whose widths "
    "are multiples of 16 (at most 32768 inputs), without LoRC or activation quantization"
)


def _refuse(name: str, what: str) -> LowbitError:
    return LowbitError(hf_folder.refusal(name, what, "the transformers SpQR layout", EXPRESSIBLE))


def check_layer(name: str, q: QuantLinear) -> SpQRWeight:
    """The layer's :class:`SpQRWeight` if the SpQR layout holds it exactly, else LowbitError."""
    if q.lowrank is not None or q.act_quant is not None or q.reassembly is not None:
        raise _refuse(name, "LoRC factors / activation quantization / channel reassembly")
    if q.bias is not None:
        raise _refuse(name, "a bias (spqr_quant's QuantizedLinear has none)")
    w = q.stored_weight()
    if not isinstance(w, SpQRWeight):
        raise _refuse(name, f"stored weight kind '{w.kind}'")
    setting = (w.bits, w.beta1, w.beta2, w.scale_bits, w.zero_bits)
    if setting != (BITS, TILE, TILE, BITS, BITS):
        raise _refuse(name, "SpQR bits {}, beta1 {}, beta2 {}, statistic bits {}/{}".format(
            *setting))
    rows, cols = w.out_features, w.in_features
    if rows % TILE or cols % TILE:
        raise _refuse(name, f"shape [{rows}, {cols}] (both must be multiples of {TILE})")
    if cols > MAX_COLUMNS:
        raise _refuse(name, f"{cols} inputs (outlier column ids are 16-bit signed)")
    return w


def _fp16_bits(t: torch.Tensor) -> torch.Tensor:
    """int64 bit patterns in ``[0, 2^16)`` of an fp16 tensor (same shape)."""
    return t.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF


def second_order_bytes(w: SpQRWeight) -> torch.Tensor:
    """int64 ``[R / 16, n, 8]``: the bytes (little-endian) of each tile's second-level word
    ``s_s | z_s << 16 | s_z << 32 | z_z << 48``."""
    halves = torch.stack([_fp16_bits(w.scale_stats.scale), _fp16_bits(w.zero_stats.scale),
                          _fp16_bits(w.scale_stats.zero), _fp16_bits(w.zero_stats.zero)], -1)
    return torch.stack([halves & 0xFF, halves >> 8], -1).flatten(-2)


def dense_weights(w: SpQRWeight) -> torch.Tensor:
    """int64 ``[R / 16 * n * 16]``: the packed tile words (module docstring)."""
    rows, cols = w.out_features, w.in_features
    n = cols // TILE
    codes = w.codes().to(torch.int64).view(rows, n, TILE)
    shifts = 2 * BITS + BITS * torch.arange(TILE, dtype=torch.int64)
    words = (codes << shifts).sum(dim=-1)  # [R, n]; disjoint bit fields, so sum == OR
    words |= w.scale_stats.codes.to(torch.int64) | w.zero_stats.codes.to(torch.int64) << BITS
    row_byte = (torch.arange(rows) % TILE) // 2  # [R]: which second-level byte a row keeps
    so = second_order_bytes(w).repeat_interleave(TILE, dim=0)  # [R, n, 8]
    words |= so.gather(-1, row_byte.view(rows, 1, 1).expand(rows, n, 1)).squeeze(-1) << 54
    return words.view(rows // TILE, TILE, n).transpose(1, 2).reshape(-1).contiguous()


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int32 with the low 32 bits of int64 ``x`` in ``[0, 2^32)`` (two's complement)."""
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def col_vals(w: SpQRWeight) -> torch.Tensor:
    """int32 ``[nnz]``: stored column in bits 0-15, fp16 outlier value in bits 16-31."""
    cols = w.outlier_cols.to(torch.int64)
    return _to_int32(_fp16_bits(w.outlier_values) << 16 | cols)


def in_perm(w: SpQRWeight) -> torch.Tensor:
    """int32 ``[C / 2]``: the permutation (identity without one) as pairs of uint16."""
    cols = w.in_features
    perm = torch.arange(cols) if w.perm is None else w.perm.to(torch.int64)
    return _to_int32(perm[0::2] | perm[1::2] << 16)


def layer_tensors(name: str, q: QuantLinear) -> dict[str, torch.Tensor]:
    """The four tensors of one linear in the SpQR layout (names relative to the layer)."""
    w = check_layer(name, q)
    return {"dense_weights": dense_weights(w), "row_offsets": w.outlier_rowptr.clone(),
            "col_vals": col_vals(w), "in_perm": in_perm(w)}


def float_linears(model: nn.Module) -> list[str]:
    """Names of the model's plain ``nn.Linear`` modules (lm_head, layers left in float)."""
    return sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)


def quantization_config(per_layer: dict[str, dict[str, torch.Tensor]],
                        not_converted: list[str]) -> dict:
    """``config.json`` ``quantization_config`` as transformers' ``SpQRConfig`` reads it.

    ``shapes`` maps ``NAME.TENSOR.shape`` to the 1-D length of each stored tensor.
    ``modules_to_not_convert`` lists each float linear both as ``NAME`` (transformers 5 matches
    module names) and as ``NAME.weight`` (transformers 4 matches weight paths).
    """
    shapes = {f"{name}.{key}.shape": int(t.numel())
              for name, own in per_layer.items() for key, t in own.items()}
    skip = sorted(not_converted + [f"{name}.weight" for name in not_converted])
    return {"quant_method": "spqr", "bits": BITS, "beta1": TILE, "beta2": TILE,
            "shapes": shapes, "modules_to_not_convert": skip}


def export_spqr(src: str | Path, out: str | Path) -> Path:
    """Write lowbit DIR ``src`` in the transformers SpQR layout to ``out``.

    Float tensors are copied in their saved dtype; ``config.json`` sets ``dtype`` (and the
    older ``torch_dtype``) to float16, the only dtype the integration runs in. Nothing is
    written when a layer is refused.
    """
    src, out, model, manifest, layers = hf_folder.load_source(src, out)
    if layout_of(model)["experts"]:
        raise LowbitError(
            f"{src} is a mixture-of-experts model; transformers' SpQR integration replaces "
            "nn.Linear modules and its experts are fused 3-D parameters, so no engine loads "
            "an SpQR export of it; use lowbit's own folder (lowbit eval/generate load it)"
        )
    per_layer = {name: layer_tensors(name, q) for name, q in layers.items()}
    config = quantization_config(per_layer, float_linears(model))
    tensors = hf_folder.export_tensors(src, per_layer, model)
    record = provenance(src, manifest, TARGET)
    return hf_folder.write_export(src, out, tensors, config, record,
                                  config_updates={"dtype": "float16", "torch_dtype": "float16"})
