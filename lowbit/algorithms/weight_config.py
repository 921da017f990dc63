"""The weight-quantization settings shared by integer weight-only methods."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from lowbit.core.config import MethodConfig, option
from lowbit.errors import LowbitError
from lowbit.formats.gguf_blocks import GGUF_TYPES, fallback_type
from lowbit.formats.gguf_layout import TYPES
from lowbit.formats.granularity import Group, parse_group_size
from lowbit.formats.intq import IntGrid
from lowbit.formats.spec import WeightSpec, int_format


@dataclass(frozen=True)
class IntWeightConfig(MethodConfig):
    """Integer weights on a min-max grid: ``bits``, ``group_size``, ``symmetric`` and
    ``ragged_groups`` are the user-facing spelling of :attr:`weight_spec` (the one place they
    are validated, :mod:`lowbit.formats.spec`); the embeddings and the LM head are never
    quantized by these methods."""

    bits: int = option(4, "weight bits, 2..8")
    group_size: int = option(128, "columns per group; -1 = per output channel")
    symmetric: bool = option(True, "symmetric grid (zero at mid code) or asymmetric (stored "
                                   "zero per group)")
    ragged_groups: bool = option(False, "allow a group size that does not divide a layer's "
                                        "input width (the last group of each row is shorter, "
                                        "as GPTQModel does); otherwise that is an error")
    ignore: tuple[str, ...] = option((), "glob patterns of linear names (e.g. "
                                         "'*.mlp.down_proj') left in full precision; the "
                                         "embeddings and the LM head are never quantized")

    def __post_init__(self) -> None:
        self.weight_spec  # noqa: B018  (validates bits, granularity and symmetry once)

    @property
    def weight_spec(self) -> WeightSpec:
        """What the weights are quantized to: ``int{bits}``, the granularity of
        ``group_size``/``ragged_groups``, ``symmetric``, fp16 scales."""
        granularity = parse_group_size(self.group_size, self.ragged_groups)
        return WeightSpec(int_format(self.bits), granularity, self.symmetric)

    @property
    def grid(self) -> IntGrid:
        return IntGrid.from_spec(self.weight_spec)

    def ignores(self, name: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for pattern in self.ignore)

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """The group size must divide the input width of every linear quantized (ragged groups
        off); subclasses with a rank add :func:`check_rank` and call this first."""
        spec = self.weight_spec
        widths = sorted({cols for _rows, cols in shapes.values()})
        for name, (_rows, cols) in shapes.items():
            if not self.ignores(name):
                spec.check_width(name, cols, widths)

    def estimated_bits(self) -> float:
        """The weight bits plus an fp16 scale and zero point per group."""
        spec = self.weight_spec
        group = spec.granularity
        return spec.bits + (32 / group.size if isinstance(group, Group) else 0.0)


def check_rank(
    config: IntWeightConfig, flag: str, rank: int, shapes: dict[str, tuple[int, int]]
) -> None:
    """LowbitError when ``rank`` exceeds min(rows, columns) of a linear ``config`` quantizes:
    no rank-``rank`` factorization of that layer exists (LoRC's SVD), or its factors would add
    parameters without adding rank (trained low-rank terms)."""
    quantized = {n: s for n, s in shapes.items() if not config.ignores(n)}
    if not quantized:
        return
    name, (rows, cols) = min(quantized.items(), key=lambda item: min(item[1]))
    most = min(rows, cols)
    if rank > most:
        raise LowbitError(
            f"{flag} {rank} is above min(rows, columns) = {most} of {name} ({rows} x {cols}); "
            f"a rank above it does not exist for that layer: choose {flag} between 1 and {most}"
        )


GGUF_PREFIX = "gguf-"
WEIGHT_FORMATS = ("int", *(GGUF_PREFIX + name for name in GGUF_TYPES))


@dataclass(frozen=True)
class BlockFormatConfig(IntWeightConfig):
    """:class:`IntWeightConfig` plus ``weight_format``: ``"int"`` (the ``bits``/``group_size``
    grid) or a llama.cpp block type ``"gguf-<type>"``, which implies its own bits and blocks
    (``bits``, ``group_size`` and ``symmetric`` are then unused). A K type on a linear whose
    input width is not a multiple of 256 falls back as llama-quantize does
    (:func:`~lowbit.formats.gguf_blocks.fallback_type`)."""

    weight_format: str = option("int", "weight format: 'int' (the --bits/--group-size grid) or "
                                       "a llama.cpp block type, which sets bits and blocks "
                                       "itself (K types on widths not divisible by 256 fall "
                                       "back like llama-quantize: q2_k/q3_k->q4_0, "
                                       "q4_k->q5_0, q5_k->q5_1, q6_k->q8_0)",
                                choices=WEIGHT_FORMATS)

    def __post_init__(self) -> None:
        super().__post_init__()
        own = self.__dataclass_fields__["weight_format"].metadata.get("choices") == WEIGHT_FORMATS
        if own and self.weight_format not in WEIGHT_FORMATS:  # (ZQFP redeclares the field)
            raise LowbitError(f"unknown weight format '{self.weight_format}' "
                              f"(--weight-format); choose one of {', '.join(WEIGHT_FORMATS)}")

    @property
    def gguf_type(self) -> str | None:
        """The llama.cpp type asked for (``"q4_k"``), or ``None`` for the int grid."""
        if not self.weight_format.startswith(GGUF_PREFIX):
            return None
        return self.weight_format.removeprefix(GGUF_PREFIX)

    def gguf_type_for(self, in_features: int) -> str:
        """The type a linear of input width ``in_features`` gets (after the fallback)."""
        return fallback_type(self.gguf_type, in_features)

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """The int grid's checks, or: every quantized linear's input width divisible by 32."""
        if self.gguf_type is None:
            super().check_shapes(shapes)
            return
        for name, (_rows, cols) in shapes.items():
            if not self.ignores(name) and self.gguf_type_for(cols) == "f16":
                raise LowbitError(
                    f"{self.weight_format} needs input widths divisible by 32, {name} has "
                    f"{cols}; leave it out with --ignore or use --weight-format int"
                )

    def estimated_bits(self) -> float:
        if self.gguf_type is None:
            return super().estimated_bits()
        return TYPES[self.gguf_type].bits_per_weight()
