"""Number formats and granularity: no model knowledge.

- :mod:`~lowbit.formats.granularity`: ``PerTensor``, ``PerChannel``, ``Group(size, ragged)``
  (the one granularity vocabulary) and the ``--group-size`` parser.
- :mod:`~lowbit.formats.spec`: ``WeightSpec`` and ``ActSpec``, what a method quantizes to.

- :mod:`~lowbit.formats.element`: ``get_format(name)`` for int2..int8, uint2..uint8, fp8_e4m3,
  fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1, e8m0, fp32/fp16/bf16 (one interface).
- :mod:`~lowbit.formats.intq`: GPTQ-convention integer grids (scale, zero per group).
- :mod:`~lowbit.formats.blockscale`: block-scaled formats (NVFP4, MXFP4/6/8, ZeroQuant-FP M1/M2).
- :mod:`~lowbit.formats.bilevel`: SpQR bilevel statistics.
- :mod:`~lowbit.formats.packing`: dense bit packing; :mod:`~lowbit.formats.bits`: bit accounting.
- :mod:`~lowbit.formats.packed_int`, :mod:`~lowbit.formats.packed_block`: stored weights,
  loadable by kind through :mod:`~lowbit.formats.codecs`.
- :mod:`~lowbit.formats.gguf_blocks`: llama.cpp block types (q8_0 ... q6_k, q3_k, q2_k) as
  stored weights holding the exact ggml bytes (:mod:`~lowbit.formats.gguf_layout` packs them,
  :mod:`~lowbit.formats.gguf_quant` rounds onto them like llama.cpp's quantizers).
"""

from lowbit.formats.bilevel import BilevelStats, bilevel_quantize
from lowbit.formats.bits import Part, bits_per_weight
from lowbit.formats.blockscale import (
    PRESETS,
    BlockQuantized,
    BlockScaledConfig,
    BlockScales,
    compute_scales,
    fake_quantize_blocks,
    preset,
    quantize_blocks,
)
from lowbit.formats.element import ElementFormat, format_names, get_format
from lowbit.formats.fp import E8M0Format, FloatFormat
from lowbit.formats.gguf_blocks import GGUFBlockWeight
from lowbit.formats.granularity import (
    Granularity,
    Group,
    PerChannel,
    PerTensor,
    parse_group_size,
)
from lowbit.formats.intfmt import DtypeFormat, IntFormat
from lowbit.formats.intq import IntGrid
from lowbit.formats.packed_block import PackedBlockWeight
from lowbit.formats.packed_int import PackedIntWeight
from lowbit.formats.spec import ActSpec, WeightSpec
from lowbit.formats.spqr_weight import SpQRWeight

__all__ = [
    "PRESETS",
    "ActSpec",
    "BilevelStats",
    "BlockQuantized",
    "BlockScaledConfig",
    "BlockScales",
    "DtypeFormat",
    "E8M0Format",
    "ElementFormat",
    "FloatFormat",
    "GGUFBlockWeight",
    "Granularity",
    "Group",
    "IntFormat",
    "IntGrid",
    "PackedBlockWeight",
    "PackedIntWeight",
    "Part",
    "PerChannel",
    "PerTensor",
    "SpQRWeight",
    "WeightSpec",
    "bilevel_quantize",
    "bits_per_weight",
    "compute_scales",
    "fake_quantize_blocks",
    "format_names",
    "get_format",
    "parse_group_size",
    "preset",
    "quantize_blocks",
]
