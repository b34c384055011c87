"""What an allocation returns: :class:`Allocation` (public) and :class:`Solved` (one allocator call)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .problem import fmt_bits, unit_bytes


@dataclass
class Solved:
    """One allocator call: the chosen width of every layer (fixed ones included), the solver's status, the total
    score of the free layers' choice, the time spent solving, the relative MIP gap and whether it is proven optimal."""

    choice: dict[str, float]
    status: str
    objective: float
    solver_seconds: float
    mip_gap: float
    optimal: bool

@dataclass
class Allocation:
    """A solved allocation.

    Attributes:
        choice: layer name -> width, for every layer of the problem (fixed layers at their fixed width).
        status: the solver's model status (``"Optimal"``, ``"Time limit reached"``, ...), or ``"Optimal"`` when
            nothing had to be solved; for a per-group solve, the first non-optimal group status, else ``"Optimal"``.
        objective: the total score of the chosen widths (free layers only). For a per-group solve this sums
            scores of different scales; compare candidates by :attr:`group_objectives` or an image metric instead.
        avg_bits: the size-weighted average width over all layers, fixed ones included.
        seconds: wall-clock time of the whole call (model building, solving, reading back), summed over groups.
        solver_seconds: time spent inside HiGHS, summed over groups.
        mip_gap: the relative MIP gap HiGHS reports (0 when proven optimal); the largest over groups.
        optimal: whether every solve was proven optimal (within ``mip_rel_gap`` / ``mip_abs_gap``).
        budget_bits: the budget ``B`` asked for.
        mode: ``"band"`` or ``"at_most"``.
        tolerance: the band half-width used.
        total_bits: sum of width x size over all layers (bits, when sizes are parameter counts).
        fixed: names of the fixed layers.
        k: the content/quality ratio of a per-group solve (``None`` for a joint solve or a ratio mapping).
        ratios: group -> relative width of a per-group solve (empty for a joint solve).
        group_budgets: group -> the budget it was solved for (empty for a joint solve).
        group_bits: group -> achieved average width over the group's layers (its fixed layers included).
        group_objectives: group -> total score of the group's chosen widths.
    """

    choice: dict[str, float]
    status: str
    objective: float
    avg_bits: float
    seconds: float
    solver_seconds: float
    mip_gap: float
    optimal: bool
    budget_bits: float
    mode: str
    tolerance: float
    total_bits: float
    fixed: frozenset[str] = frozenset()
    k: float | None = None
    ratios: dict[str, float] = field(default_factory=dict)
    group_budgets: dict[str, float] = field(default_factory=dict)
    group_bits: dict[str, float] = field(default_factory=dict)
    group_objectives: dict[str, float] = field(default_factory=dict)

    def counts(self, include_fixed: bool = False) -> dict[float, int]:
        """Width -> number of layers at that width (free layers only unless ``include_fixed``), widest last."""
        c = Counter(b for n, b in self.choice.items() if include_fixed or n not in self.fixed)
        return dict(sorted(c.items()))

    def size(self, unit: str = "MB") -> float:
        """:attr:`total_bits` in ``unit`` (see :data:`SIZE_UNITS`); meaningful when sizes are parameter counts."""
        return self.total_bits / 8 / unit_bytes(unit)

    def summary(self) -> str:
        """One line: average width, budget, width histogram, status, gap and time."""
        hist = ", ".join(f"{n}x{fmt_bits(b)}" for b, n in self.counts().items())
        extra = f" k={self.k:g}" if self.k is not None else ""
        return (
            f"avg {self.avg_bits:.3f} bits (budget {self.budget_bits:g}, {self.mode}){extra}: {hist}; "
            f"{self.status}, gap {self.mip_gap:.2g}, {self.seconds * 1000:.0f} ms"
        )


def as_width(b: float) -> float:
    """Widths come back as ints when they are whole numbers (the usual 2 / 4 / 8)."""
    return int(b) if float(b).is_integer() else float(b)


def average(choice: Mapping[str, float], sizes: Mapping[str, float], names: Iterable[str]) -> tuple[float, float]:
    names = list(names)
    total_bits = float(sum(choice[n] * sizes[n] for n in names))
    total = float(sum(sizes[n] for n in names))
    return total_bits, total_bits / total


