"""Block-scaled formats: element codes times a per-block scale (plus optional extra levels).

A weight ``w [R, C]`` is cut into blocks by its granularity (the one vocabulary of
:mod:`lowbit.formats.granularity`): :class:`~lowbit.formats.granularity.Group` -> blocks of
``size`` consecutive input columns of one row (a shorter last block when the size does not
divide C, as in :mod:`lowbit.formats.intq`), :class:`~lowbit.formats.granularity.PerChannel`
-> one block per output row, :class:`~lowbit.formats.granularity.PerTensor` -> one block for
the whole tensor. Each block has a scale ``s`` and each weight is stored as an element code
``c`` with ``w ~= decode(c) * s``.

Scale rules (``scale_rule``), with ``amax`` the block's max |w| and ``E`` the element format:

* ``"amax"``: ``s = amax / E.max`` rounded to nearest in ``scale_format`` (saturating). With
  ``tensor_scale`` (NVFP4), the compressed-tensors convention: a float32 global scale
  ``g = scale_format.max * E.max / amax(w)`` is stored, the block scale is stored as
  ``round(g * (amax / E.max))`` and the effective scale is ``stored / g``. (NVIDIA ModelOpt
  stores ``1 / g`` as ``weight_scale_2`` instead; same numbers.)
* ``"mx"``: OCP MX v1.0: ``s = 2**(floor(log2(amax)) - E.emax)`` stored as E8M0; elements
  beyond ``E.max`` saturate (the spec's clipping). An all-zero block gets ``2**-127``.
* ``"m1"`` (ZeroQuant-FP M1): ``s = 2**ceil(log2(amax / E.max))``, E8M0. Rounded *up*, so no
  weight is clipped (the largest maps to at most ``E.max``); at most one binade coarser.
* ``"m2"`` (ZeroQuant-FP M2): one real scale per row ``r = max_blocks(amax) / E.max`` stored in
  ``scale_format`` (fp32/fp16/bf16) and per block a power-of-two ratio ``2**k`` (E8M0 codes),
  ``k = ceil(log2(amax_block / E.max / r))`` (rounded up: no clipping); ``s = r * 2**k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lowbit.formats.element import ElementFormat, get_format
from lowbit.formats.fp import E8M0Format, FloatFormat, pow2
from lowbit.formats.granularity import (
    Granularity,
    Group,
    PerChannel,
    PerTensor,
    as_granularity,
    from_stored,
    scale_grid,
    to_stored,
)
from lowbit.formats.intfmt import DtypeFormat, IntFormat
from lowbit.formats.intq import expand_groups, pad_to_groups

if TYPE_CHECKING:
    from lowbit.formats.spec import WeightSpec

SCALE_RULES = ("amax", "mx", "m1", "m2")
STORED_KEYS = ("element", "group_size", "scale_format", "scale_rule", "tensor_scale", "version")


@dataclass(frozen=True)
class BlockScaledConfig:
    """A block-scaled format: ``element`` codes (a format name of ``get_format``, at most 8
    bits, signed) with one scale per ``granularity`` block (per tensor, per channel or groups;
    an int is read as the stored ``group_size`` spelling,
    :func:`~lowbit.formats.granularity.from_stored`), stored in ``scale_format`` (``fp32``,
    ``fp16``, ``bf16``, ``fp8_e4m3``, ``e8m0``, ...; for ``m2`` the format of the per-row real
    scale) by ``scale_rule`` (``amax``, ``mx``, ``m1`` or ``m2``, module docstring);
    ``tensor_scale`` stores a second-level float32 per-tensor scale (``amax`` rule only).
    ``version`` is the schema version of :meth:`to_dict`."""

    element: str = "fp4_e2m1"
    granularity: Granularity = Group(32)
    scale_format: str = "fp32"
    scale_rule: str = "amax"
    tensor_scale: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        elem = get_format(self.element)
        if elem.bits > 8 or isinstance(elem, E8M0Format) or elem.min >= 0:
            raise ValueError(
                f"element format '{self.element}' cannot be block-scaled: use a signed format"
                " of at most 8 bits (int2..int8, fp8_e4m3, fp8_e5m2, fp6_*, fp4_e2m1)"
            )
        granularity = as_granularity(self.granularity)
        if granularity is not self.granularity:  # an int in the stored spelling, read once
            object.__setattr__(self, "granularity", granularity)
        scale = get_format(self.scale_format)
        if isinstance(scale, IntFormat):
            raise ValueError(f"scale_format '{self.scale_format}' is an integer format; use a "
                             "float format (fp32, fp16, bf16, fp8_e4m3, e8m0)")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule '{self.scale_rule}' unknown; known: {SCALE_RULES}")
        if self.scale_rule in ("mx", "m1") and not isinstance(scale, E8M0Format):
            raise ValueError(f"scale_rule '{self.scale_rule}' stores powers of two: set "
                             "scale_format='e8m0'")
        if self.scale_rule == "mx" and not isinstance(elem, FloatFormat):
            raise ValueError("scale_rule 'mx' needs a float element format (MX emax_elem)")
        if self.scale_rule == "m2":
            if not isinstance(scale, DtypeFormat):
                raise ValueError("scale_rule 'm2' keeps one real scale per row: set scale_format "
                                 "to fp32, fp16 or bf16")
            if not isinstance(granularity, Group):
                raise ValueError(f"scale_rule 'm2' needs groups (ratios per group), not "
                                 f"{granularity.describe()}")
        if self.tensor_scale and self.scale_rule != "amax":
            raise ValueError("tensor_scale is only defined for scale_rule 'amax' (NVFP4)")
        if self.version != 1:
            raise ValueError(f"BlockScaledConfig version {self.version} unsupported (1)")

    @classmethod
    def from_spec(
        cls, spec: WeightSpec, scale_rule: str = "amax", tensor_scale: bool = False
    ) -> BlockScaledConfig:
        """The block-scaled format of a :class:`~lowbit.formats.spec.WeightSpec` (element,
        granularity and scale format) with ``scale_rule``."""
        if not spec.symmetric:
            raise ValueError("block-scaled formats are symmetric (no zero point)")
        return cls(spec.format, spec.granularity, spec.scale_format, scale_rule, tensor_scale)

    @property
    def group_size(self) -> int:
        """The stored spelling of the granularity (:func:`~lowbit.formats.granularity.to_stored`):
        -1 per channel, 0 per tensor, else the group size."""
        return to_stored(self.granularity)

    @property
    def element_format(self) -> ElementFormat:
        return get_format(self.element)

    @property
    def scale_fmt(self) -> ElementFormat:
        return get_format(self.scale_format)

    def block_grid(self, rows: int, cols: int) -> tuple[int, int, int]:
        """``(block_rows, blocks_per_row, block_width)`` of the scale grid for ``[rows, cols]``."""
        return scale_grid(self.granularity, rows, cols)

    def to_dict(self) -> dict:
        """The saved metadata (version 1): ``element``, ``group_size`` (stored spelling),
        ``scale_format``, ``scale_rule``, ``tensor_scale``, ``version``."""
        return {"element": self.element, "group_size": self.group_size,
                "scale_format": self.scale_format, "scale_rule": self.scale_rule,
                "tensor_scale": self.tensor_scale, "version": self.version}

    @classmethod
    def from_dict(cls, d: dict) -> BlockScaledConfig:
        unknown = sorted(set(d) - set(STORED_KEYS))
        if unknown:
            raise ValueError(f"unknown BlockScaledConfig key '{unknown[0]}'; known: "
                             f"{', '.join(sorted(STORED_KEYS))}")
        d = dict(d)
        if "group_size" in d:
            d["granularity"] = from_stored(d.pop("group_size"))
        return cls(**d)


PRESETS: dict[str, BlockScaledConfig] = {
    "nvfp4": BlockScaledConfig("fp4_e2m1", Group(16), "fp8_e4m3", "amax", tensor_scale=True),
    "mxfp4": BlockScaledConfig("fp4_e2m1", Group(32), "e8m0", "mx"),
    "mxfp6_e2m3": BlockScaledConfig("fp6_e2m3", Group(32), "e8m0", "mx"),
    "mxfp6_e3m2": BlockScaledConfig("fp6_e3m2", Group(32), "e8m0", "mx"),
    "mxfp8": BlockScaledConfig("fp8_e4m3", Group(32), "e8m0", "mx"),
    "mxfp8_e5m2": BlockScaledConfig("fp8_e5m2", Group(32), "e8m0", "mx"),
    "fp4_m1": BlockScaledConfig("fp4_e2m1", Group(128), "e8m0", "m1"),
    "fp4_m2": BlockScaledConfig("fp4_e2m1", Group(128), "fp16", "m2"),
}


def preset(name: str) -> BlockScaledConfig:
    """A named block-scaled format (``nvfp4``, ``mxfp4``, ``mxfp8``, ``fp4_m1``, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown block format preset '{name}'; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def _blocks(w: torch.Tensor, cfg: BlockScaledConfig) -> torch.Tensor:
    """float32 ``[block_rows, blocks_per_row, block_width]`` view of ``w [R, C]`` (padded)."""
    rows, cols = w.shape
    w = w.float()
    g = cfg.granularity
    if isinstance(g, PerTensor):
        return w.reshape(1, 1, -1)
    if isinstance(g, PerChannel):
        return w.reshape(rows, 1, cols)
    return pad_to_groups(w, g.size)[0]


def _unblock(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return x.reshape(rows, -1)[:, :cols]


def _floor_log2(x: torch.Tensor) -> torch.Tensor:
    """int64 ``floor(log2(x))`` for positive float32 ``x`` (exact, subnormals included)."""
    return torch.frexp(x)[1].to(torch.int64) - 1


def _ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """int64 ``ceil(log2(x))`` for positive float32 ``x`` (exact)."""
    m, e = torch.frexp(x)
    return e.to(torch.int64) - (m == 0.5).to(torch.int64)


def _e8m0_codes(k: torch.Tensor) -> torch.Tensor:
    return (k.clamp(-127, 127) + 127).to(torch.uint8)


@dataclass(frozen=True)
class BlockScales:
    """The stored scales of one weight ``[rows, cols]`` under ``config``.

    Tensors (``Rb, nb`` = ``config.block_grid(rows, cols)[:2]``):
        scales: ``[Rb, nb]``: uint8 codes when the scale format has at most 8 bits
            (fp8_e4m3, e8m0; for ``m2`` the E8M0 ratio codes), else that dtype (fp32/fp16/bf16).
        row_scales: ``m2`` only: ``[rows]`` in ``scale_format``'s dtype.
        tensor_scale: ``tensor_scale`` only: float32 ``[1]``, the global scale ``g``.
    """

    config: BlockScaledConfig
    rows: int
    cols: int
    scales: torch.Tensor
    row_scales: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        rb, nb, _ = self.config.block_grid(self.rows, self.cols)
        if tuple(self.scales.shape) != (rb, nb):
            raise ValueError(f"scales shape {tuple(self.scales.shape)} != expected {(rb, nb)}")
        if (self.row_scales is not None) != (self.config.scale_rule == "m2"):
            raise ValueError("row_scales must be given exactly for scale_rule 'm2'")
        if (self.tensor_scale is not None) != self.config.tensor_scale:
            raise ValueError("tensor_scale must be given exactly when config.tensor_scale")

    def block_values(self) -> torch.Tensor:
        """float32 ``[Rb, nb]`` decoded stored block scales (the ratios ``2**k`` for ``m2``)."""
        fmt = get_format("e8m0") if self.config.scale_rule == "m2" else self.config.scale_fmt
        return fmt.decode(self.scales)

    def effective(self) -> torch.Tensor:
        """float32 ``[Rb, nb]``: the scale each block's element values are multiplied by."""
        s = self.block_values()
        if self.row_scales is not None:
            s = self.row_scales.float()[:, None] * s
        if self.tensor_scale is not None:
            s = s / self.tensor_scale.float()
        return s

    def per_element(self) -> torch.Tensor:
        """float32 ``[rows, cols]``: each weight's effective scale."""
        s = self.effective()
        g = self.config.granularity
        if isinstance(g, Group):
            return expand_groups(s, g.size, self.cols)
        return s.expand(self.rows, self.cols) if s.shape[0] == 1 else s.expand(-1, self.cols)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"scales": self.scales}
        if self.row_scales is not None:
            out["row_scales"] = self.row_scales
        if self.tensor_scale is not None:
            out["tensor_scale"] = self.tensor_scale
        return out


def compute_scales(w: torch.Tensor, cfg: BlockScaledConfig) -> BlockScales:
    """Block scales of ``w`` (float ``[R, C]``, finite) by ``cfg.scale_rule``."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [R, C], got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds NaN or inf; block scales need finite weights")
    rows, cols = w.shape
    elem, sfmt = cfg.element_format, cfg.scale_fmt
    amax = _blocks(w, cfg).abs().amax(dim=-1)  # [Rb, nb]
    rule = cfg.scale_rule
    if rule == "amax":
        s = amax / elem.max
        g = None
        if cfg.tensor_scale:
            t_amax = w.float().abs().max()
            g = sfmt.max * elem.max / t_amax if t_amax > 0 else torch.ones((), device=w.device)
            g = g.float().reshape(1)
            s = g * s
        stored = sfmt.encode(s.clamp(min=sfmt.min_positive))
        return BlockScales(cfg, rows, cols, stored, tensor_scale=g)
    if rule == "mx":
        k = torch.where(amax > 0, _floor_log2(amax) - elem.emax, -127)
        return BlockScales(cfg, rows, cols, _e8m0_codes(k))
    if rule == "m1":
        k = torch.where(amax > 0, _ceil_log2(amax / elem.max), -127).clamp(-127, 127)
        k = _no_clip(k, amax, torch.ones_like(amax), elem.max)
        return BlockScales(cfg, rows, cols, _e8m0_codes(k))
    # m2: a real scale per row, power-of-two ratios per block
    r = sfmt.encode(amax.amax(dim=1) / elem.max)
    r = torch.where(r.float() > 0, r, torch.ones_like(r))  # all-zero row: any scale works
    rf = r.float()[:, None].expand_as(amax)
    ratio = amax / elem.max / rf
    k = torch.where(amax > 0, _ceil_log2(ratio.clamp(min=2.0**-149)), 0).clamp(-127, 127)
    k = _no_clip(k, amax, rf, elem.max)
    return BlockScales(cfg, rows, cols, _e8m0_codes(k), row_scales=r)


def _no_clip(
    k: torch.Tensor, amax: torch.Tensor, base: torch.Tensor, emax: float
) -> torch.Tensor:
    """Raise ``k`` by one where ``amax / (base * 2**k)`` still exceeds ``emax`` (rounding of
    ``amax / emax`` can land a hair below a power of two)."""
    over = amax / (base * pow2(k, torch.float32)) > emax
    return torch.where(over, k + 1, k).clamp(-127, 127)


@dataclass(frozen=True)
class BlockQuantized:
    """A weight quantized to a block-scaled format (codes not yet packed).

    Attributes:
        codes: uint8 ``[rows, cols]`` element codes (``config.element`` encoding).
        scales: the :class:`BlockScales`.
    """

    codes: torch.Tensor
    scales: BlockScales

    def __post_init__(self) -> None:
        if tuple(self.codes.shape) != (self.scales.rows, self.scales.cols):
            raise ValueError("codes shape does not match the scales' weight shape")

    @property
    def config(self) -> BlockScaledConfig:
        return self.scales.config

    def dequantize(self) -> torch.Tensor:
        """float32 ``[rows, cols]`` = ``decode(codes) * effective scale``."""
        return self.config.element_format.decode(self.codes) * self.scales.per_element()


def quantize_blocks(
    w: torch.Tensor, cfg: BlockScaledConfig, scales: BlockScales | None = None
) -> BlockQuantized:
    """Quantize ``w`` (float ``[R, C]``) to ``cfg``; ``scales`` defaults to
    :func:`compute_scales`. Elements are ``E.encode(w / s)`` (round to nearest even,
    saturating)."""
    if scales is None:
        scales = compute_scales(w, cfg)
    codes = cfg.element_format.encode(w.float() / scales.per_element())
    return BlockQuantized(codes, scales)


def fake_quantize_blocks(w: torch.Tensor, cfg: BlockScaledConfig) -> torch.Tensor:
    """float32 ``[R, C]``: ``dequantize(quantize_blocks(w, cfg))``."""
    return quantize_blocks(w, cfg).dequantize()
