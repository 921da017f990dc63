"""Granularity: which weights of a ``[rows, cols]`` matrix share one scale. The one vocabulary
of every format and method.

- :class:`PerTensor`: one scale for the whole tensor (block-scaled formats only).
- :class:`PerChannel`: one scale per output row (a single group spanning the input width).
- :class:`Group` ``(size, ragged=False)``: ``size`` consecutive input columns of one row per
  scale. The one rule: ``size >= 2`` (a group of one column is an unscaled weight). With
  ``ragged`` the last group of a row may be shorter, when ``size`` does not divide the width
  (as GPTQModel does); without it such a width is an error (:func:`check_width`, which method
  configs run on a model's widths before quantizing; the formats themselves compute a shorter
  last group whenever a width needs one, e.g. the widened input of QLLM's reassembly).

Two spellings as plain integers, one per surface:

- user-facing (the ``--group-size`` flag, the ``group_size`` recipe key):
  :func:`parse_group_size`: ``-1`` per channel, ``N >= 2`` groups of N columns. No method
  quantizes weights per tensor, so per tensor has no user-facing spelling.
- stored (the ``group_size`` of saved :class:`~lowbit.formats.intq.IntGrid` and
  :class:`~lowbit.formats.blockscale.BlockScaledConfig` metadata, unchanged since format
  version 1): :func:`to_stored` / :func:`from_stored`: ``-1`` per channel, ``0`` per tensor,
  ``N`` groups. It carries no ragged bit, so it reads back as a ragged group: a stored weight
  has whatever width it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowbit.errors import LowbitError

GROUP_SIZE_FLAG = "--group-size"


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole weight."""

    def describe(self) -> str:
        return "per tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per output row (a group as wide as the input)."""

    def describe(self) -> str:
        return "per channel"


@dataclass(frozen=True)
class Group:
    """``size`` consecutive input columns of a row per scale; ``size >= 2``. ``ragged``: the
    last group of a row may be shorter when ``size`` does not divide the width. It is a
    permission that :func:`check_width` checks against a model's widths; a weight is quantized
    the same either way, so it takes no part in equality (a group read back from the stored
    spelling equals the one it was saved from)."""

    size: int
    ragged: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 2:
            raise LowbitError(
                f"group size {self.size!r} ({GROUP_SIZE_FLAG}) is not valid: use -1 (per "
                "channel) or a group of N >= 2 columns"
            )

    def describe(self) -> str:
        return f"groups of {self.size}{' (ragged)' if self.ragged else ''}"


Granularity = PerTensor | PerChannel | Group


def parse_group_size(value: int, ragged: bool = False) -> PerChannel | Group:
    """The granularity of the user-facing ``group_size``: ``-1`` per channel, ``N >= 2``
    groups of N columns (``ragged``: a shorter last group is allowed). Anything else is a
    LowbitError naming ``--group-size``."""
    if value == -1 and not isinstance(value, bool):
        return PerChannel()
    return Group(value, ragged)


def to_stored(granularity: Granularity) -> int:
    """The stored spelling: ``-1`` per channel, ``0`` per tensor, the size of a group."""
    if isinstance(granularity, Group):
        return granularity.size
    return 0 if isinstance(granularity, PerTensor) else -1


def from_stored(value: int) -> Granularity:
    """The granularity of a stored ``group_size`` (``-1``, ``0`` or ``N >= 2``); a group reads
    back ragged (the stored spelling carries no ragged bit). ValueError for anything else."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"stored group_size must be an integer, got {value!r}")
    if value == 0:
        return PerTensor()
    if value == -1:
        return PerChannel()
    if value < 2:
        raise ValueError(f"stored group_size must be -1, 0 or >= 2, got {value}")
    return Group(value, ragged=True)


def as_granularity(value: Granularity | int) -> Granularity:
    """``value`` itself, or the granularity of a stored ``group_size`` (:func:`from_stored`);
    ValueError for anything else."""
    if isinstance(value, PerTensor | PerChannel | Group):
        return value
    return from_stored(value)


def _row_groups(granularity: Granularity) -> PerChannel | Group:
    if isinstance(granularity, PerTensor):
        raise ValueError("per-tensor granularity has no groups within a row")
    return granularity


def group_width(granularity: Granularity, in_features: int) -> int:
    """Columns per group: all ``in_features`` per channel, ``size`` for groups (a ragged last
    group is shorter). ValueError for per tensor."""
    g = _row_groups(granularity)
    return in_features if isinstance(g, PerChannel) else g.size


def fits(granularity: Granularity, in_features: int) -> bool:
    """Whether the granularity applies to rows of ``in_features``: anything but a non-ragged
    group that does not divide the width."""
    if isinstance(granularity, Group) and not granularity.ragged:
        return in_features % granularity.size == 0
    return True


def n_groups(granularity: Granularity, in_features: int) -> int:
    """Groups per row of ``in_features`` columns: 1 per channel, ``ceil(in_features / size)``
    for groups (the last one shorter when ``size`` does not divide the width: the formats
    always compute it; whether a method allows it is :func:`check_width`'s question).
    ValueError for per tensor."""
    return -(-in_features // group_width(granularity, in_features))


def scale_grid(granularity: Granularity, rows: int, cols: int) -> tuple[int, int, int]:
    """``(scale_rows, scales_per_row, elements_per_scale)`` of a ``[rows, cols]`` weight: ``(1,
    1, rows * cols)`` per tensor, ``(rows, 1, cols)`` per channel, ``(rows, n_groups, size)``
    for groups."""
    if isinstance(granularity, PerTensor):
        return 1, 1, rows * cols
    return rows, n_groups(granularity, cols), group_width(granularity, cols)


def common_divisors(widths: list[int], smallest: int = 8) -> list[int]:
    """Group sizes from ``smallest`` up that divide every width of ``widths``."""
    from math import gcd

    g = 0
    for w in widths:
        g = gcd(g, w)
    return [d for d in range(smallest, g + 1) if g % d == 0]


def check_width(granularity: Granularity, name: str, in_features: int,
                all_widths: list[int]) -> None:
    """LowbitError when ``granularity`` does not apply to linear ``name``'s input width: a
    group size that does not divide it, without ragged groups. Names the flags and the sizes
    that divide every width in ``all_widths``."""
    if fits(granularity, in_features):
        return
    assert isinstance(granularity, Group)
    divisors = ", ".join(str(d) for d in common_divisors(all_widths))
    raise LowbitError(
        f"group size {granularity.size} does not divide the input width {in_features} of "
        f"{name}; group sizes that divide every width: {divisors}, or -1 (per channel), or "
        "allow a shorter last group with --ragged-groups"
    )
