"""Which CPU kernel each stored-weight format gets, by activation dtype (the CPU planners, in
the order registered here).

For bf16 activations:

- ``int``, 2-4 bits, groups of 16 or of a multiple of 32, or one per row: ``int4``;
- ``int``, 5-8 bits, one group per row: ``int8``;
- ``spqr``, 2-4 bits, ``beta1`` 16 or a multiple of 32, or one group per row: ``spqr-int4``;
- anything else (other groups, 5-8 bit groups, ``block`` FP4/FP8/MX weights): ``dense``.

fp16 activations always get ``dense``. fp32 activations keep the exact paths, so evaluation
numbers do not change: ``spqr-tiled`` for SpQR (:func:`lowbit.kernels.spqr_cpu.plan_spqr_tiled`),
no prepared kernel (the reference) for the rest.
``int4``/``int8``/``spqr-int4`` read the packed codes through torch's int4pack/int8pack ops,
which are fast only for bf16 activations; ``dense`` dequantizes once into the activation dtype.
Importing this module registers the planners, SpQR's too (QuantLinear imports it).
"""

from __future__ import annotations

import torch

from lowbit.formats.packed_int import PackedIntWeight
from lowbit.formats.spqr_weight import SpQRWeight
from lowbit.kernels import dispatch, spqr_cpu
from lowbit.kernels.dense_cpu import REDUCED, build_dense
from lowbit.kernels.int4_cpu import build_int4
from lowbit.kernels.int8_cpu import build_int8


def plan_int(request: dispatch.KernelRequest):
    """``int4`` for 2-4 bit codes, ``int8`` for 5-8 bits per channel (bf16 activations only);
    None otherwise (the dense fallback then applies)."""
    stored, bias, dtype = request.stored, request.bias, request.dtype
    if dtype != torch.bfloat16:
        return None
    bits, cols = stored.grid.bits, stored.in_features
    group = stored.grid.group_width(cols)
    scale, zero = stored.scales.float(), stored.zero_points()
    if bits <= 4:
        return build_int4(stored.codes(), bits, scale, zero, group, stored.perm, bias, dtype)
    if group >= cols:
        return build_int8(stored.codes(), scale, zero, bits, stored.perm, bias, dtype)
    return None


def plan_dense(request: dispatch.KernelRequest):
    """Any stored weight, dequantized once into bf16/fp16; None for fp32 (the reference)."""
    if request.dtype not in REDUCED:
        return None
    return build_dense(request.stored, request.bias, request.dtype)


dispatch.register_planner(PackedIntWeight.kind, plan_int)
dispatch.register_planner(SpQRWeight.kind, spqr_cpu.plan_spqr)
dispatch.register_planner(SpQRWeight.kind, spqr_cpu.plan_spqr_tiled)
dispatch.register_planner(dispatch.ANY_KIND, plan_dense)
