"""What a method quantizes to, as two value types: :class:`WeightSpec` (element format,
granularity, symmetry, scale format) and :class:`ActSpec` (activation format or none,
token/tensor granularity, symmetry). Each is validated once, at construction, with a
LowbitError that names the command-line flag of the setting that is wrong; method configs
expose theirs as ``config.weight_spec`` / ``config.act_spec`` and the formats are built from
them (:meth:`lowbit.formats.intq.IntGrid.from_spec`,
:meth:`lowbit.formats.blockscale.BlockScaledConfig.from_spec`,
:meth:`lowbit.nn.act_quant.ActQuantizer.from_spec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lowbit.errors import LowbitError
from lowbit.formats.element import ElementFormat, format_names, get_format
from lowbit.formats.fp import E8M0Format, FloatFormat
from lowbit.formats.granularity import Granularity, Group, PerChannel, PerTensor, check_width
from lowbit.formats.intfmt import IntFormat

ACT_GRANULARITIES = ("token", "tensor")
NOT_QUANTIZED_BITS = 16  # what "activations not quantized" counts as (``abits`` 16)


def int_format(bits: int) -> str:
    """The integer element format of ``--bits``: ``int{bits}`` for 2..8, else a LowbitError
    naming the flag."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise LowbitError(f"bits must be between 2 and 8, got {bits} (--bits)")
    return f"int{bits}"


def weight_format(name: str) -> FloatFormat | IntFormat:
    """The element format ``name`` if weights can use it (a signed integer or float format of
    2..8 bits), else a LowbitError naming ``--weight-format``."""
    try:
        fmt = get_format(name)
    except ValueError as exc:
        raise LowbitError(f"--weight-format: {exc}") from None
    if not _weight_ok(fmt):
        raise LowbitError(
            f"weight format '{name}' (--weight-format) must be a signed FP or integer format "
            "(fp4_e2m1, fp8_e4m3, int4, int8, ...)"
        )
    return fmt


def weight_format_names() -> tuple[str, ...]:
    """Every format name :func:`weight_format` accepts."""
    return tuple(n for n in format_names() if _weight_ok(get_format(n)))


def _weight_ok(fmt: ElementFormat) -> bool:
    return isinstance(fmt, FloatFormat | IntFormat) and fmt.min < 0 and fmt.bits >= 2


def act_format_names() -> tuple[str, ...]:
    """Every format name :func:`check_act_format` accepts."""
    return tuple(n for n in format_names() if _act_ok(get_format(n)))


def _act_ok(fmt: ElementFormat) -> bool:
    return fmt.bits <= 8 and fmt.min < 0 and not isinstance(fmt, E8M0Format)


def check_act_granularity(granularity: str) -> None:
    """LowbitError naming ``--act-granularity`` unless ``granularity`` is token or tensor."""
    if granularity not in ACT_GRANULARITIES:
        raise LowbitError(
            f"activation granularity '{granularity}' (--act-granularity) unknown; known: "
            f"{', '.join(ACT_GRANULARITIES)}"
        )


def check_act_format(name: str) -> ElementFormat:
    """The element format ``name`` if activations can use it (signed, at most 8 bits, not
    e8m0), else ValueError."""
    fmt = get_format(name)
    if not _act_ok(fmt):
        raise ValueError(
            f"activation format '{name}' must be a signed format of at most 8 bits "
            "(int8, fp8_e4m3, fp8_e5m2, ...)"
        )
    return fmt


@dataclass(frozen=True)
class WeightSpec:
    """Weights on ``format`` (an element format name of :func:`~lowbit.formats.element.get_format`:
    ``int2``..``int8``, ``fp4_e2m1``, ``fp8_e4m3``, ...) with one scale per ``granularity``
    block stored in ``scale_format`` (``fp16``, ``e8m0``, ...); ``symmetric`` grids fix the
    zero (integer formats may be asymmetric, float formats are symmetric). ``bits`` is the
    format's width."""

    format: str = "int4"
    granularity: Granularity = Group(128)
    symmetric: bool = True
    scale_format: str = "fp16"

    def __post_init__(self) -> None:
        fmt = weight_format(self.format)
        if not isinstance(self.granularity, PerTensor | PerChannel | Group):
            raise LowbitError(
                f"granularity must be PerTensor(), PerChannel() or Group(size), got "
                f"{self.granularity!r} (--group-size)"
            )
        if isinstance(fmt, FloatFormat) and not self.symmetric:
            raise LowbitError("FP weight formats are symmetric; drop --asym")
        try:
            scale = get_format(self.scale_format)
        except ValueError as exc:
            raise LowbitError(f"scale format: {exc}") from None
        if isinstance(scale, IntFormat):
            raise LowbitError(
                f"scale format '{self.scale_format}' is an integer format; scales are stored "
                "in a float format (fp32, fp16, bf16, fp8_e4m3, e8m0)"
            )

    @property
    def element(self) -> FloatFormat | IntFormat:
        return weight_format(self.format)

    @property
    def bits(self) -> int:
        """Bits per element code (the format's width)."""
        return self.element.bits

    @property
    def is_float(self) -> bool:
        return isinstance(self.element, FloatFormat)

    def check_width(self, name: str, in_features: int, all_widths: list[int]) -> None:
        """LowbitError when the granularity does not apply to linear ``name``'s input width
        (:func:`~lowbit.formats.granularity.check_width`)."""
        check_width(self.granularity, name, in_features, all_widths)

    def describe(self) -> str:
        kind = "" if self.symmetric else " asymmetric"
        return f"{self.format}{kind} {self.granularity.describe()}, {self.scale_format} scales"


@dataclass(frozen=True)
class ActSpec:
    """A linear layer's input quantized to ``format`` (``int8``, ``fp8_e4m3``, ...; ``None``:
    not quantized, :meth:`none`), with a dynamic scale per ``"token"`` or one static scale per
    ``"tensor"``; ``symmetric`` False is an asymmetric per-token integer grid."""

    format: str | None = None
    granularity: str = "token"
    symmetric: bool = True

    NONE: ClassVar[ActSpec]

    def __post_init__(self) -> None:
        if self.format is None:
            if (self.granularity, self.symmetric) != ("token", True):
                raise LowbitError(
                    "activations that are not quantized have no granularity or symmetry; "
                    "use ActSpec.none()"
                )
            return
        try:
            fmt = check_act_format(self.format)
        except ValueError as exc:
            raise LowbitError(f"--act-format: {exc}, or none") from None
        check_act_granularity(self.granularity)
        if not self.symmetric and (not isinstance(fmt, IntFormat) or self.granularity != "token"):
            raise LowbitError(
                f"asymmetric activations are per-token integer formats, not {self.format} "
                f"per-{self.granularity}"
            )

    @classmethod
    def none(cls) -> ActSpec:
        """Activations not quantized."""
        return cls.NONE

    @classmethod
    def integer(cls, bits: int, granularity: str = "token", symmetric: bool = True) -> ActSpec:
        """``int{bits}`` activations for ``--abits`` 2..8; :meth:`none` for 16; else a
        LowbitError naming the flag."""
        if bits == NOT_QUANTIZED_BITS and not isinstance(bits, bool):
            return cls.NONE
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise LowbitError(
                f"abits must be 2..8 (integer activations) or 16 (not quantized), got {bits} "
                "(--abits)"
            )
        return cls(f"int{bits}", granularity, symmetric)

    @property
    def quantized(self) -> bool:
        return self.format is not None

    @property
    def bits(self) -> int:
        """Bits per activation: the format's width, 16 when not quantized."""
        return NOT_QUANTIZED_BITS if self.format is None else get_format(self.format).bits

    def describe(self) -> str:
        if self.format is None:
            return "not quantized"
        kind = "" if self.symmetric else " asymmetric"
        return f"{self.format}{kind} per-{self.granularity}"


ActSpec.NONE = ActSpec()
