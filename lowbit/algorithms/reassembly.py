"""QLLM channel reassembly, pure tensor functions (Liu et al. 2023, section 3.1).

For the input ``x`` ``[T, C]`` of a group of linears (weights ``W`` ``[R, C]``, rows of all
linears sharing the input stacked):

* **disassembly**: a channel with ``max|x_c| > theta`` becomes ``T_c = ceil(max|x_c| / theta)``
  channels ``x_c / T_c``, its weight column repeated ``T_c`` times (exact);
* **assembly**: to keep ``C`` channels, ``sum(T_c - 1)`` pairs of similar non-outlier channels
  are merged: ``(x_a + x_b) / 2`` with column ``w_a + w_b`` (error ``(x_a - x_b)(w_a - w_b)/2``).
  Pairs are scored, as in the authors' code, by ``((sum w_a + sum w_b) ||x_a - x_b||)^2``
  (``"code"``) or by the paper's Eq. 5, ``||x_a - x_b||^2 ||w_a - w_b||^2 / 4`` (``"eq5"``),
  between the even- and odd-numbered non-outlier channels; the lowest scores win greedily.

The result is a :class:`Plan`, the ``(first, second, divisor)`` entries of
:class:`~lowbit.nn.reassembly.ChannelReassembly`, and :func:`reassemble_weight` gives ``W'``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.nn.reassembly import ChannelReassembly

PAIR_SCORES = ("code", "eq5")
MAX_SPLIT = 255


@dataclass(frozen=True)
class Plan:
    """One reassembly: ``C'`` entries, int64 ``[C']`` each (module docstring of
    :mod:`lowbit.nn.reassembly`).

    Attributes:
        theta: the threshold it was built with (``inf``: identity).
        extra: channels added by disassembly; ``merged``: pairs assembled.
    """

    first: torch.Tensor
    second: torch.Tensor
    divisor: torch.Tensor
    theta: float
    extra: int
    merged: int

    @property
    def width(self) -> int:
        return self.first.numel()

    def module(self, in_features: int) -> ChannelReassembly:
        return ChannelReassembly(self.first, self.second, self.divisor, in_features)

    def source_divisors(self, in_features: int) -> torch.Tensor:
        """int64 ``[C]``: the divisor each input channel is read with (``T_c`` for a split
        channel, 2 for a merged one, 1 otherwise), so that dividing the input by it before a
        :meth:`gather_only` plan gives this plan's output.

        Raises:
            ValueError: a channel is read with two divisors (build_plan never does this).
        """
        merged = self.second != self.first
        d = torch.ones(in_features, dtype=torch.long, device=self.first.device)
        d[self.first] = self.divisor
        d[self.second[merged]] = self.divisor[merged]
        if not (torch.equal(d[self.first], self.divisor)
                and torch.equal(d[self.second[merged]], self.divisor[merged])):
            raise ValueError("a channel is read with two divisors; the plan cannot be folded")
        return d

    def gather_only(self) -> Plan:
        """The same entries with every divisor 1: the plan once its divisors are folded into
        what produces the input (:meth:`source_divisors`)."""
        return dataclasses.replace(self, divisor=torch.ones_like(self.divisor))


def reassemble_weight(weight: torch.Tensor, plan: Plan) -> torch.Tensor:
    """``W'`` ``[R, C']`` fp32 for ``W`` ``[R, C]``: split columns repeated, merged summed."""
    w = weight.detach().float()
    merged = (plan.second != plan.first).float()
    return w[:, plan.first] + w[:, plan.second] * merged


class ReassembledLinear(nn.Module):
    """A full-precision linear behind a reassembly, no quantization: ``R(x) W'^T + b``
    (checks that reassembly alone leaves a block's output unchanged)."""

    def __init__(self, linear: nn.Linear, plan: Plan) -> None:
        super().__init__()
        self.gather = plan.module(linear.in_features)
        self.weight = reassemble_weight(linear.weight, plan)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.gather(x), self.weight, self.bias)


def split_counts(absmax: torch.Tensor, theta: float) -> torch.Tensor:
    """int64 ``[C]``: ``T_c = ceil(max|x_c| / theta)`` (at least 1) for ``absmax`` ``[C]``."""
    return torch.ceil(absmax.double() / theta).clamp(min=1).long()


def extra_channels(absmax: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
    """int64 ``[n]``: channels disassembly adds at each threshold of ``thetas`` ``[n]``."""
    t = torch.ceil(absmax.double()[None, :] / thetas.double()[:, None]).clamp(min=1)
    return (t - 1).sum(dim=1).long()


def threshold_candidates(absmax: torch.Tensor, max_extra: int, steps: int) -> list[float]:
    """Up to ``steps`` thresholds, from ``max|x|`` (identity) downward, at which the number of
    extra channels changes, spread evenly over extra counts ``0..max_extra``.

    The candidates are the points ``max|x_c| / k`` (integer ``k``) where some ``T_c`` steps;
    the extra count grows along them, so each target count is found by bisection.
    """
    top = float(absmax.max())
    if top <= 0 or max_extra <= 0 or steps <= 1:
        return [top]
    # below top / (max_extra + 1) the largest channel alone exceeds max_extra; no channel is
    # split into more than MAX_SPLIT copies (the stored divisor is one byte)
    floor = top / min(max_extra + 1, MAX_SPLIT)
    ks = torch.arange(1, min(max_extra + 1, MAX_SPLIT) + 1, dtype=torch.float64,
                      device=absmax.device)
    points = absmax.double()[:, None] / ks[None, :]
    points = torch.unique(points[points >= floor]).flip(0)  # descending: extra grows

    def extra_at(i: int) -> int:
        return int(extra_channels(absmax, points[i : i + 1]))

    last = _last_index_within(extra_at, len(points), max_extra)
    chosen: dict[int, float] = {}
    for target in torch.linspace(0, extra_at(last), steps).tolist():
        i = _first_index_reaching(extra_at, last + 1, target)
        chosen.setdefault(extra_at(i), float(points[i]))
    return sorted(chosen.values(), reverse=True)


def _last_index_within(extra_at, n: int, limit: int) -> int:
    """Largest ``i < n`` with ``extra_at(i) <= limit`` (``extra_at`` nondecreasing, index 0 ok)."""
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if extra_at(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _first_index_reaching(extra_at, n: int, target: float) -> int:
    """Smallest ``i < n`` with ``extra_at(i) >= target`` (``n - 1`` if none)."""
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if extra_at(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def pair_scores(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                score: str) -> torch.Tensor:
    """fp32 ``[len(a), len(b)]`` merge costs of channel pairs (module docstring).

    Args:
        x: ``[T, C]`` sample inputs. weight: ``[R, C]``. a, b: int64 channel ids.
    """
    xt = x.float().T
    dist = torch.cdist(xt[a], xt[b])  # ||x_a - x_b||_2 over the sample tokens
    w = weight.float()
    if score == "code":
        colsum = w.sum(dim=0)
        return ((colsum[a][:, None] + colsum[b][None, :]) * dist) ** 2
    if score == "eq5":
        wdist = torch.cdist(w.T[a], w.T[b])
        return (dist * wdist) ** 2 / 4
    raise ValueError(f"pair score '{score}' unknown; known: {', '.join(PAIR_SCORES)}")


def choose_pairs(scores: torch.Tensor, count: int) -> list[tuple[int, int]]:
    """Greedy ``count`` disjoint (row, column) pairs of ``scores`` ``[n, m]``, lowest first."""
    order = torch.argsort(scores.flatten()).tolist()
    m = scores.shape[1]
    used_a: set[int] = set()
    used_b: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for flat in order:
        if len(pairs) == count:
            break
        i, j = divmod(flat, m)
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        pairs.append((i, j))
    return pairs


def build_plan(
    x: torch.Tensor,
    absmax: torch.Tensor,
    weight: torch.Tensor,
    theta: float,
    assemble: bool = True,
    score: str = "code",
) -> Plan:
    """The reassembly of one input at threshold ``theta``.

    Args:
        x: ``[T, C]`` sample inputs (for pair scores). absmax: ``[C]`` max |x| over the
            calibration set. weight: ``[R, C]`` rows of every linear reading this input.
        assemble: merge pairs to keep ``C`` channels (else the input widens by ``extra``).
    """
    c = absmax.numel()
    counts = split_counts(absmax, theta).cpu()  # index bookkeeping on the host, O(C)
    outlier = counts > 1
    extra = int((counts - 1).sum())
    partner = torch.full((c,), -1, dtype=torch.long)
    merged = 0
    if assemble and extra:
        normal = torch.nonzero(~outlier).flatten()
        a, b = normal[0::2], normal[1::2]
        a = a[: b.numel()]
        scores = pair_scores(x, weight, a.to(x.device), b.to(x.device), score)
        pairs = choose_pairs(scores, min(extra, b.numel()))
        for i, j in pairs:
            partner[a[i]] = b[j]
            partner[b[j]] = -2  # absorbed into its partner's entry
        merged = len(pairs)
    # untouched channels stay in place (the run-time gather then copies them whole); a split
    # channel's first copy stays in place, the others fill the slots merged partners free,
    # then extend the width
    entries: list[tuple[int, int, int]] = []
    free: list[int] = []
    for ch in range(c):
        p = int(partner[ch])
        if p >= 0:
            entries.append((ch, p, 2))
        elif p == -1:
            entries.append((ch, ch, int(counts[ch])))
        else:
            entries.append((ch, ch, 1))  # placeholder, replaced by a split copy below
            free.append(ch)
    copies = [(ch, ch, int(counts[ch])) for ch in torch.nonzero(outlier).flatten().tolist()
              for _ in range(int(counts[ch]) - 1)]
    assert len(free) <= len(copies)  # merged pairs <= extra channels
    for slot, entry in zip(free, copies, strict=False):
        entries[slot] = entry
    entries += copies[len(free):]
    first, second, divisor = (torch.tensor(v, dtype=torch.long, device=weight.device)
                              for v in zip(*entries, strict=True))
    return Plan(
        first,
        second,
        divisor,
        theta if extra else math.inf,
        extra,
        merged,
    )
