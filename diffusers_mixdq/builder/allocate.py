"""Allocation: choose a bit-width per layer by integer linear programming (MixDQ's last recipe-building step).

Given, for every layer, a sensitivity score at each candidate width (higher is better: SSIM against the FP image,
SQNR in dB of the denoiser output, ...) and the layer's size, pick one width per layer so that the total score is
as high as possible while the size-weighted average width meets a budget::

    binary x[l, b],  sum_b x[l, b] = 1 for every layer l
    maximise   sum_{l, b} x[l, b] * s[l, b]
    subject to (B - tol) * W  <=  F + sum_{l, b} x[l, b] * b * w_l  <=  (B + tol) * W     ("band", MixDQ's form)
           or                     F + sum_{l, b} x[l, b] * b * w_l  <=  B * W             ("at_most": a size budget)

where ``w_l`` is the layer's size (parameter count when allocating weight bits, input element count when allocating
activation bits), ``W`` the size of all layers (fixed ones included) and ``F`` the bits of the *fixed* layers
(protected layers kept in FP16, or layers pinned at a width), which count towards the average at their width.

Scores of different groups live on different scales (SSIM near 1 versus SQNR in tens of dB), so MixDQ solves each
group on its own, splitting the budget between groups by a ratio ``k`` (``b_content = k * b_quality`` with the
size-weighted average held at ``B``), sweeps ``k`` (and ``B``) and keeps the candidate whose images are closest to
FP. :func:`solve` solves one joint problem (all scores must be comparable), :func:`solve_groups` solves per group,
:func:`sweep` enumerates candidates over ``k`` / ``B`` and :func:`pick` keeps the one a caller-supplied metric
likes best. :func:`budget_for_size` turns a target size in MB into an average-bits budget.

The solver is HiGHS (``highspy``), used through its Python API, warm-started from a greedy allocation. By default
it runs to proven optimality (``mip_rel_gap=0``); a 1,000-layer x 3-width problem solves in well under a second
(``benchmarks/ilp_speed.py``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Literal, Mapping, Sequence

import numpy as np

from ..errors import MixDQError

Mode = Literal["band", "at_most"]
MODES = ("band", "at_most")

#: bytes per unit accepted by :func:`budget_for_size` and :meth:`Allocation.size`
SIZE_UNITS: dict[str, int] = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}

#: relative slack (of the average width) used when checking budgets and solutions in floating point
_EPS = 1e-9
#: slack (in average bits) allowed between the solver's solution and the budget when verifying it afterwards
_VERIFY_SLACK = 1e-6


class AllocationError(MixDQError):
    """The allocation problem is malformed (bad sizes, scores, names, options) or the solver failed."""


class BudgetInfeasibleError(AllocationError):
    """No choice of candidate widths meets the budget.

    Attributes:
        budget: the average-bits budget asked for.
        smallest: the smallest size-weighted average width reachable with these candidates and fixed layers.
        largest: the largest one.
        group: the group the budget was for (``None`` for a joint problem).
    """

    def __init__(
        self,
        message: str,
        *,
        budget: float,
        smallest: float,
        largest: float,
        group: str | None = None,
    ):
        super().__init__(message)
        self.budget = budget
        self.smallest = smallest
        self.largest = largest
        self.group = group


@dataclass(frozen=True)
class LayerChoice:
    """A layer whose width is to be chosen.

    Args:
        name: layer name (unique across the problem, fixed layers included).
        size: its weight in the average: parameter count (weight bits) or input element count (activation bits).
        group: the group whose scores it shares a scale with (MixDQ: ``"content"`` or ``"quality"``).
        scores: candidate width -> sensitivity score, higher is better. Only the widths listed are candidates
            (e.g. ``{2: .., 4: .., 8: ..}`` for content layers, ``{4: .., 8: ..}`` for quality layers).
    """

    name: str
    size: float
    group: str
    scores: Mapping[int, float]


@dataclass(frozen=True)
class FixedLayer:
    """A layer kept at a given width (protected layers in FP16: ``bits=16``). It counts towards the average.

    Args:
        name: layer name.
        size: its weight in the average, as for :class:`LayerChoice`.
        bits: the width it is kept at.
        group: the group it belongs to when solving per group (:func:`solve_groups`); ``None`` keeps it outside
            every group, counting only in the overall average.
    """

    name: str
    size: float
    bits: float
    group: str | None = None


@dataclass(frozen=True)
class AllocationProblem:
    """Layers to allocate, layers held fixed, and the budget.

    Args:
        layers: the layers whose width is chosen.
        budget_bits: ``B``, the size-weighted average width over all layers (fixed ones included).
        tolerance: half-width of the band ``[B - tolerance, B + tolerance]`` in ``"band"`` mode (MixDQ: 0.02).
            Unused in ``"at_most"`` mode.
        mode: ``"band"``: the average must land within the band (MixDQ's two-sided constraint); ``"at_most"``:
            the average must not exceed ``B`` (what a size budget means).
        fixed: layers kept at a width; their bits count towards the average.
    """

    layers: Sequence[LayerChoice]
    budget_bits: float
    tolerance: float = 0.02
    mode: Mode = "band"
    fixed: Sequence[FixedLayer] = ()

    def with_budget(self, budget_bits: float) -> "AllocationProblem":
        """The same problem with another budget."""
        return replace(self, budget_bits=float(budget_bits))

    @property
    def total_size(self) -> float:
        """``W``: the size of every layer, fixed ones included."""
        return float(sum(l.size for l in self.layers) + sum(f.size for f in self.fixed))

    @property
    def groups(self) -> list[str]:
        """Groups with at least one layer to allocate, in order of first appearance."""
        return list(dict.fromkeys(l.group for l in self.layers))


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
        return self.total_bits / 8 / _unit_bytes(unit)

    def summary(self) -> str:
        """One line: average width, budget, width histogram, status, gap and time."""
        hist = ", ".join(f"{n}x{_fmt_bits(b)}" for b, n in self.counts().items())
        extra = f" k={self.k:g}" if self.k is not None else ""
        return (
            f"avg {self.avg_bits:.3f} bits (budget {self.budget_bits:g}, {self.mode}){extra}: {hist}; "
            f"{self.status}, gap {self.mip_gap:.2g}, {self.seconds * 1000:.0f} ms"
        )


# --------------------------------------------------------------------------------------------------------------
# validation and budget arithmetic


def _unit_bytes(unit: str) -> int:
    try:
        return SIZE_UNITS[unit]
    except KeyError:
        raise AllocationError(f"Unknown size unit {unit!r}; use one of {', '.join(SIZE_UNITS)}.") from None


def _fmt_bits(b: float) -> str:
    return f"{b:g}"


def _finite(x: float) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(float(x))


def _validate(problem: AllocationProblem) -> None:
    if problem.mode not in MODES:
        raise AllocationError(f"Unknown allocation mode {problem.mode!r}; use 'band' or 'at_most'.")
    if not _finite(problem.budget_bits) or problem.budget_bits <= 0:
        raise AllocationError(f"The budget must be a positive number of bits, got {problem.budget_bits!r}.")
    if not _finite(problem.tolerance) or problem.tolerance < 0:
        raise AllocationError(f"The tolerance must be a non-negative number of bits, got {problem.tolerance!r}.")
    seen: set[str] = set()
    for layer in list(problem.layers) + list(problem.fixed):
        if layer.name in seen:
            raise AllocationError(f"Layer {layer.name!r} appears more than once (names must be unique).")
        seen.add(layer.name)
        if not _finite(layer.size) or layer.size <= 0:
            raise AllocationError(f"Layer {layer.name!r} has size {layer.size!r}; sizes must be positive numbers.")
    for f in problem.fixed:
        if not _finite(f.bits) or f.bits <= 0:
            raise AllocationError(f"Fixed layer {f.name!r} has width {f.bits!r}; widths must be positive.")
    for layer in problem.layers:
        if not layer.scores:
            raise AllocationError(
                f"Layer {layer.name!r} has no candidate widths; give it scores, or make it a FixedLayer."
            )
        for b, s in layer.scores.items():
            if not _finite(b) or b <= 0:
                raise AllocationError(f"Layer {layer.name!r} has candidate width {b!r}; widths must be positive.")
            if not _finite(s):
                raise AllocationError(
                    f"Layer {layer.name!r} has score {s!r} at {_fmt_bits(b)} bits; scores must be finite "
                    "(drop the candidate instead of scoring it -inf/NaN)."
                )
    if not problem.layers and not problem.fixed:
        raise AllocationError("The allocation problem has no layers.")


def achievable_range(problem: AllocationProblem) -> tuple[float, float]:
    """The smallest and largest size-weighted average width reachable with the candidates and fixed layers."""
    _validate(problem)
    return _range(problem.layers, problem.fixed)


def _range(layers: Sequence[LayerChoice], fixed: Sequence[FixedLayer]) -> tuple[float, float]:
    total = sum(l.size for l in layers) + sum(f.size for f in fixed)
    fixed_bits = sum(f.size * f.bits for f in fixed)
    lo = (fixed_bits + sum(l.size * min(l.scores) for l in layers)) / total
    hi = (fixed_bits + sum(l.size * max(l.scores) for l in layers)) / total
    return lo, hi


def budget_for_size(
    problem: AllocationProblem | Sequence[LayerChoice],
    size: float,
    unit: str = "MB",
    *,
    fixed: Sequence[FixedLayer] | None = None,
    other_bytes: float = 0.0,
) -> float:
    """The average-bits budget ``B`` that makes the listed layers take ``size`` ``unit`` in total.

    Sizes must be parameter counts (a weight-bits problem). Fixed layers count at their fixed width: with ``W``
    all layers' parameters, ``B = (size_bytes - other_bytes) * 8 / W``; the ILP then subtracts the fixed layers'
    bits from what the free layers may use. ``other_bytes`` is storage outside the listed layers (biases, norms,
    quantization scales) to take off the target first. Use the result with ``mode="at_most"``.

    Args:
        problem: an :class:`AllocationProblem` (its layers and fixed layers are used), or a list of layers.
        size: the target size, in ``unit``.
        unit: one of :data:`SIZE_UNITS` (``"MB"`` is 10**6 bytes, ``"MiB"`` 2**20).
        fixed: fixed layers, when ``problem`` is a list of layers (default: the problem's own).
        other_bytes: bytes to reserve for everything that is not a listed layer.
    """
    if isinstance(problem, AllocationProblem):
        layers, fixed_layers = list(problem.layers), list(problem.fixed if fixed is None else fixed)
    else:
        layers, fixed_layers = list(problem), list(fixed or ())
    if not _finite(size) or size <= 0:
        raise AllocationError(f"The target size must be a positive number, got {size!r}.")
    total = float(sum(l.size for l in layers) + sum(f.size for f in fixed_layers))
    if total <= 0:
        raise AllocationError("The layers have no size; cannot turn a size in bytes into an average width.")
    available = size * _unit_bytes(unit) - other_bytes
    if available <= 0:
        raise AllocationError(
            f"A target of {size:g} {unit} leaves nothing for the layers once other_bytes={other_bytes:g} are taken."
        )
    return available * 8 / total


def _infeasible_message(budget: float, lo: float, hi: float, mode: str, tol: float, group: str | None) -> str:
    where = f" for group {group!r}" if group is not None else ""
    if mode == "at_most":
        return (
            f"A {budget:g}-bit average{where} is not reachable: with these candidates the smallest is {lo:.2f} bits "
            f"(largest {hi:.2f}). Raise the budget or allow lower widths."
        )
    if budget + tol < lo:
        return (
            f"A {budget:g}-bit average (±{tol:g}){where} is not reachable: with these candidates the smallest is "
            f"{lo:.2f} bits (largest {hi:.2f}). Raise the budget or allow lower widths."
        )
    if budget - tol > hi:
        return (
            f"A {budget:g}-bit average (±{tol:g}){where} is not reachable: with these candidates the largest is "
            f"{hi:.2f} bits (smallest {lo:.2f}). Lower the budget or allow higher widths."
        )
    return (
        f"No choice of widths lands within {budget:g} ± {tol:g} bits{where}: the reachable averages lie between "
        f"{lo:.2f} and {hi:.2f} bits but are discrete (a few large layers dominate). Widen the tolerance, use "
        "mode='at_most', or move the budget."
    )


# --------------------------------------------------------------------------------------------------------------
# the ILP


@dataclass(frozen=True)
class _Options:
    """HiGHS settings shared by :func:`solve`, :func:`solve_groups` and :func:`sweep` (see :func:`solve`)."""

    time_limit: float | None = 60.0
    mip_rel_gap: float = 0.0
    mip_abs_gap: float = 1e-6
    sub_mip_heuristics: bool = False
    warm_start: bool = True

    def __post_init__(self):
        if self.time_limit is not None and not (_finite(self.time_limit) and self.time_limit > 0):
            raise AllocationError(
                f"time_limit must be a positive number of seconds or None, got {self.time_limit!r}."
            )
        for name in ("mip_rel_gap", "mip_abs_gap"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise AllocationError(f"{name} must be a non-negative number, got {value!r}.")


@dataclass
class _Solved:
    choice: dict[str, float]
    status: str
    objective: float
    solver_seconds: float
    mip_gap: float
    optimal: bool


def _solve_ilp(
    layers: Sequence[LayerChoice],
    fixed: Sequence[FixedLayer],
    budget: float,
    tol: float,
    mode: str,
    group: str | None,
    options: _Options,
) -> _Solved:
    """Solve one budgeted choice problem over ``layers`` (``fixed`` count towards the average) with HiGHS."""
    import highspy

    lo_avg, hi_avg = _range(layers, fixed)
    scale = max(abs(budget), 1.0) * _EPS
    if mode == "at_most":
        infeasible = budget < lo_avg - scale
    else:
        infeasible = budget + tol < lo_avg - scale or budget - tol > hi_avg + scale
    def infeasible_error() -> BudgetInfeasibleError:
        return BudgetInfeasibleError(
            _infeasible_message(budget, lo_avg, hi_avg, mode, tol, group),
            budget=budget, smallest=lo_avg, largest=hi_avg, group=group,
        )

    if infeasible:
        raise infeasible_error()
    fixed_choice = {f.name: f.bits for f in fixed}
    if not layers:
        return _Solved(fixed_choice, "Optimal", 0.0, 0.0, 0.0, True)

    total = float(sum(l.size for l in layers) + sum(f.size for f in fixed))
    fixed_avg = sum(f.size * f.bits for f in fixed) / total

    # flatten the candidates: column j is (layer owner[j], width bits[j]); candidates sorted by width per layer
    widths = [sorted(l.scores) for l in layers]
    counts = np.fromiter((len(w) for w in widths), dtype=np.int64, count=len(layers))
    starts = np.zeros(len(layers) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    n = int(starts[-1])
    bits = np.fromiter((b for w in widths for b in w), dtype=np.float64, count=n)
    score = np.fromiter((l.scores[b] for l, w in zip(layers, widths) for b in w), dtype=np.float64, count=n)
    owner = np.repeat(np.arange(len(layers)), counts)
    size = np.fromiter((l.size for l in layers), dtype=np.float64, count=len(layers))

    # minimise the loss against each layer's best candidate: same optimum as maximising the score, and the MIP
    # gap is then relative to what is actually traded away rather than to a large constant
    best = np.maximum.reduceat(score, starts[:-1])
    loss = best[owner] - score

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("log_to_console", False)
    h.setOptionValue("random_seed", 0)
    h.setOptionValue("mip_rel_gap", float(options.mip_rel_gap))
    h.setOptionValue("mip_abs_gap", float(options.mip_abs_gap))
    h.setOptionValue("mip_heuristic_run_rins", bool(options.sub_mip_heuristics))
    h.setOptionValue("mip_heuristic_run_rens", bool(options.sub_mip_heuristics))
    if options.time_limit is not None:
        h.setOptionValue("time_limit", float(options.time_limit))
    inf = highspy.kHighsInf

    h.addCols(n, loss, np.zeros(n), np.ones(n), 0, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0))
    h.changeColsIntegrality(n, np.arange(n, dtype=np.int32), np.ones(n, dtype=np.uint8))  # kInteger

    # one assignment row per layer (sum_b x = 1), then the budget row on the average width (coefficients b*w/W)
    m = len(layers)
    coef = bits * size[owner] / total
    if mode == "at_most":
        row_lo, row_hi = -inf, budget - fixed_avg
    else:
        row_lo, row_hi = budget - tol - fixed_avg, budget + tol - fixed_avg
    lower = np.concatenate([np.ones(m), [row_lo]])
    upper = np.concatenate([np.ones(m), [row_hi]])
    row_starts = np.concatenate([starts[:-1], [n]]).astype(np.int32)
    index = np.concatenate([np.arange(n), np.arange(n)]).astype(np.int32)
    value = np.concatenate([np.ones(n), coef])
    h.addRows(m + 1, lower, upper, 2 * n, row_starts, index, value)

    if options.warm_start:
        start = _greedy_start(starts, owner, coef, loss, row_lo, row_hi)
        if start is not None:  # HiGHS checks it and ignores it if it is not feasible
            x0 = np.zeros(n)
            x0[start] = 1.0
            h.setSolution(n, np.arange(n, dtype=np.int32), x0)
    t0 = time.perf_counter()
    h.run()
    solver_seconds = time.perf_counter() - t0

    model_status = h.getModelStatus()
    status = h.modelStatusToString(model_status)
    info = h.getInfo()
    has_solution = int(info.primal_solution_status) == int(highspy.kSolutionStatusFeasible)
    if model_status == highspy.HighsModelStatus.kInfeasible:
        raise infeasible_error()
    if not has_solution:
        where = f" for group {group!r}" if group is not None else ""
        raise AllocationError(
            f"HiGHS found no allocation{where} ({status}) for a {budget:g}-bit budget; raise time_limit "
            f"(was {options.time_limit}) or loosen mip_rel_gap."
        )
    x = np.asarray(h.getSolution().col_value, dtype=np.float64)
    # the largest x of each layer is its chosen width (robust to values like 0.9999999)
    pick = np.array([starts[i] + int(np.argmax(x[starts[i] : starts[i + 1]])) for i in range(m)], dtype=np.int64)
    choice = {l.name: _as_width(bits[j]) for l, j in zip(layers, pick)}

    avg = fixed_avg + float(np.sum(bits[pick] * size)) / total
    ok = avg <= row_hi + fixed_avg + _VERIFY_SLACK and (mode == "at_most" or avg >= row_lo + fixed_avg - _VERIFY_SLACK)
    if not ok:  # should not happen; guards against rounding a fractional solution
        raise AllocationError(
            f"HiGHS returned an allocation averaging {avg:.6f} bits, outside the budget {budget:g} "
            f"({mode}, tolerance {tol:g}); this is a bug, please report it."
        )
    optimal = model_status == highspy.HighsModelStatus.kOptimal
    gap = float(info.mip_gap)
    if not math.isfinite(gap):  # HiGHS reports an infinite gap when the objective and its bound are both ~0
        gap = 0.0 if optimal else math.inf
    if not optimal:
        warnings.warn(
            f"HiGHS stopped before proving optimality ({status}, MIP gap {gap:.3g}); the allocation is feasible "
            "but may not be the best. Raise time_limit for an exact one.",
            RuntimeWarning,
            stacklevel=3,
        )
    choice.update(fixed_choice)
    return _Solved(
        choice=choice,
        status=status,
        objective=float(np.sum(score[pick])),
        solver_seconds=solver_seconds,
        mip_gap=gap,
        optimal=optimal,
    )


def _greedy_start(
    starts: np.ndarray, owner: np.ndarray, coef: np.ndarray, loss: np.ndarray, row_lo: float, row_hi: float
) -> np.ndarray | None:
    """A feasible starting allocation for HiGHS: the chosen column of every layer, or ``None`` if none was found.

    The Lagrangian relaxation of the budget row is solved by bisection on its multiplier (each layer then picks
    ``argmin loss + lam * coef``; the smallest ``lam`` that fits under ``row_hi``), and the room left is filled
    greedily, best loss saved per unit of budget first. Handing HiGHS this near-optimal incumbent lets it fix most
    columns by reduced cost right after the root LP. Ties go to the narrower width.
    """
    head = starts[:-1]

    def choose(lam):
        order = np.lexsort((loss + lam * coef, owner))
        return order[head]

    pick = choose(0.0)
    if coef[pick].sum() > row_hi:
        gaps = np.diff(coef)[np.diff(owner) == 0]
        gaps = gaps[gaps > 0]
        if gaps.size == 0:
            return None
        hi = (loss.max() - loss.min() + 1.0) / gaps.min()
        if coef[choose(hi)].sum() > row_hi:
            return None
        lo = 0.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if coef[choose(mid)].sum() > row_hi:
                lo = mid
            else:
                hi = mid
        pick = choose(hi)
    # greedy fill of the remaining room, best loss saved per unit of budget first
    used = coef[pick].sum()
    cur = pick[owner]
    gain = loss[cur] - loss
    extra = coef - coef[cur]
    cand = np.nonzero((gain > 0) & (extra > 0))[0]
    if cand.size:
        order = cand[np.argsort(-gain[cand] / extra[cand], kind="stable")]
        for j in order:
            l = owner[j]
            e = coef[j] - coef[pick[l]]
            if loss[j] < loss[pick[l]] and e > 0 and used + e <= row_hi:
                used += e
                pick[l] = j
    if used < row_lo:
        return None
    return pick


def _as_width(b: float) -> float:
    """Widths come back as ints when they are whole numbers (the usual 2 / 4 / 8)."""
    return int(b) if float(b).is_integer() else float(b)


def _avg(choice: Mapping[str, float], sizes: Mapping[str, float], names: Iterable[str]) -> tuple[float, float]:
    names = list(names)
    total_bits = float(sum(choice[n] * sizes[n] for n in names))
    total = float(sum(sizes[n] for n in names))
    return total_bits, total_bits / total


def solve(
    problem: AllocationProblem,
    *,
    time_limit: float | None = 60.0,
    mip_rel_gap: float = 0.0,
    mip_abs_gap: float = 1e-6,
    sub_mip_heuristics: bool = False,
    warm_start: bool = True,
) -> Allocation:
    """Solve the allocation ILP jointly over all layers, ignoring groups.

    Every score must be on one scale: with SSIM-scored and dB-scored layers in one problem the dB layers would win
    every trade. Use :func:`solve_groups` (or :func:`sweep`) for MixDQ's per-group solve.

    Args:
        problem: layers, fixed layers and the budget.
        time_limit: seconds HiGHS may spend (``None``: no limit). When it runs out with a feasible allocation, that
            allocation is returned with ``optimal=False`` and its MIP gap, and a ``RuntimeWarning`` is issued.
        mip_rel_gap: relative optimality gap at which HiGHS stops (0: prove optimality; HiGHS's own default is
            1e-4). The gap is relative to the total score lost against each layer's best candidate.
        mip_abs_gap: absolute optimality gap, in score units.
        sub_mip_heuristics: run HiGHS's RINS / RENS sub-MIP heuristics. Off by default: with one budget row over
            one-of-n rows they rarely find what rounding and the warm start do not, and at 1,000 layers x 3 widths
            they cost about 20% of the solve time without changing the (proven optimal) result.
        warm_start: hand HiGHS a greedy starting allocation (Lagrangian relaxation, then a greedy fill); it lets
            HiGHS fix most columns by reduced cost early (about 1.4x faster at 1,000 x 3) and never changes the
            optimum.

    Raises:
        BudgetInfeasibleError: no choice of widths meets the budget (the message names the reachable range).
        AllocationError: the problem is malformed, or HiGHS found no allocation within the time limit.
    """
    options = _Options(time_limit, mip_rel_gap, mip_abs_gap, sub_mip_heuristics, warm_start)
    _validate(problem)
    t0 = time.perf_counter()
    solved = _solve_ilp(
        problem.layers, problem.fixed, float(problem.budget_bits), float(problem.tolerance), problem.mode, None, options
    )
    sizes = {l.name: l.size for l in problem.layers} | {f.name: f.size for f in problem.fixed}
    total_bits, avg = _avg(solved.choice, sizes, sizes)
    groups = {}
    for l in problem.layers:
        groups.setdefault(l.group, []).append(l.name)
    for f in problem.fixed:
        if f.group is not None:
            groups.setdefault(f.group, []).append(f.name)
    return Allocation(
        choice=solved.choice,
        status=solved.status,
        objective=solved.objective,
        avg_bits=avg,
        seconds=time.perf_counter() - t0,
        solver_seconds=solved.solver_seconds,
        mip_gap=solved.mip_gap,
        optimal=solved.optimal,
        budget_bits=float(problem.budget_bits),
        mode=problem.mode,
        tolerance=float(problem.tolerance),
        total_bits=total_bits,
        fixed=frozenset(f.name for f in problem.fixed),
        group_bits={g: _avg(solved.choice, sizes, names)[1] for g, names in groups.items()},
        group_objectives={
            g: float(sum(l.scores[solved.choice[l.name]] for l in problem.layers if l.group == g))
            for g in problem.groups
        },
    )


# --------------------------------------------------------------------------------------------------------------
# per-group solving, sweeps and picking


def _ratios_for(problem: AllocationProblem, k: float | Mapping[str, float], content_group: str) -> dict[str, float]:
    groups = problem.groups
    if isinstance(k, Mapping):
        ratios = {str(g): float(r) for g, r in k.items()}
        missing, extra = set(groups) - set(ratios), set(ratios) - set(groups)
        if missing or extra:
            raise AllocationError(
                f"The ratio mapping must give every group with layers to allocate ({', '.join(groups)}) a relative "
                f"width; missing {sorted(missing)}, unknown {sorted(extra)}."
            )
    else:
        if len(groups) == 1:
            ratios = {groups[0]: 1.0}
        elif len(groups) == 2 and content_group in groups:
            other = groups[0] if groups[1] == content_group else groups[1]
            ratios = {content_group: float(k), other: 1.0}
        else:
            raise AllocationError(
                f"A single ratio k splits the budget between {content_group!r} and one other group, but the "
                f"groups to allocate are {groups}; pass content_group=, or a mapping group -> relative width."
            )
    for g, r in ratios.items():
        if not _finite(r) or r <= 0:
            raise AllocationError(f"The relative width of group {g!r} must be positive, got {r!r}.")
    return ratios


def group_budgets(
    problem: AllocationProblem, k: float | Mapping[str, float] = 1.0, *, content_group: str = "content"
) -> dict[str, float]:
    """Split the average-bits budget ``B`` between groups.

    With a float ``k`` and two groups, ``b_content = k * b_other``; with a mapping ``{group: r_g}``,
    ``b_g = r_g * t``. In both cases ``t`` is set so that the size-weighted average over all layers is ``B``:
    ``sum_g W_g * b_g + F_0 = B * W``, with ``W_g`` the size of group ``g`` (its fixed layers included) and
    ``F_0`` the bits of fixed layers outside every allocated group. Each group's budget ``b_g`` is then the average
    width over that group's layers, its fixed layers included.
    """
    _validate(problem)
    ratios = _ratios_for(problem, k, content_group)
    size_of: dict[str, float] = {g: 0.0 for g in ratios}
    outside_bits = 0.0
    for l in problem.layers:
        size_of[l.group] += l.size
    for f in problem.fixed:
        if f.group in size_of:
            size_of[f.group] += f.size
        else:
            outside_bits += f.size * f.bits
    denom = sum(ratios[g] * size_of[g] for g in ratios)
    t = (problem.budget_bits * problem.total_size - outside_bits) / denom
    if t <= 0:
        lo, hi = _range(problem.layers, problem.fixed)
        raise BudgetInfeasibleError(
            f"A {problem.budget_bits:g}-bit average is not reachable: the fixed layers outside the allocated groups "
            f"already use the whole budget (with these candidates the smallest is {lo:.2f} bits, largest "
            f"{hi:.2f}). Raise the budget.",
            budget=float(problem.budget_bits),
            smallest=lo,
            largest=hi,
        )
    return {g: ratios[g] * t for g in ratios}


def solve_groups(
    problem: AllocationProblem,
    k: float | Mapping[str, float] = 1.0,
    *,
    content_group: str = "content",
    time_limit: float | None = 60.0,
    mip_rel_gap: float = 0.0,
    mip_abs_gap: float = 1e-6,
    sub_mip_heuristics: bool = False,
    warm_start: bool = True,
) -> Allocation:
    """Solve each group on its own, with the budget split between groups by :func:`group_budgets`.

    Each group ``g`` gets the ILP over its own layers with budget ``b_g`` (band ``b_g ± tolerance`` or at most
    ``b_g``, over the group's layers and its fixed layers), so the overall average is ``B ± tolerance`` (or at
    most ``B``). Fixed layers outside every allocated group count only in the overall average.

    Args:
        k: ``b_content / b_other`` for two groups, or a mapping group -> relative width.
        content_group: the group ``k`` multiplies (MixDQ: ``"content"``).
        time_limit, mip_rel_gap, mip_abs_gap, sub_mip_heuristics, warm_start: solver settings for every group,
            as in :func:`solve`.

    Raises:
        BudgetInfeasibleError: a group's budget cannot be met; the message names the group, its budget and its
            reachable range (the exception's ``group`` attribute too).
    """
    options = _Options(time_limit, mip_rel_gap, mip_abs_gap, sub_mip_heuristics, warm_start)
    _validate(problem)
    t0 = time.perf_counter()
    budgets = group_budgets(problem, k, content_group=content_group)
    ratios = _ratios_for(problem, k, content_group)
    choice: dict[str, float] = {}
    group_objectives: dict[str, float] = {}
    statuses, solver_seconds, gaps, optimal = [], 0.0, [], True
    for g, b_g in budgets.items():
        layers = [l for l in problem.layers if l.group == g]
        fixed = [f for f in problem.fixed if f.group == g]
        try:
            solved = _solve_ilp(
                layers, fixed, b_g, float(problem.tolerance), problem.mode, g, options
            )
        except BudgetInfeasibleError as e:
            split = f"k={k:g}" if not isinstance(k, Mapping) else f"ratios {dict(k)}"
            raise BudgetInfeasibleError(
                f"{e} (Group {g!r} got {b_g:.3f} bits from the {problem.budget_bits:g}-bit budget split by {split}.)",
                budget=e.budget,
                smallest=e.smallest,
                largest=e.largest,
                group=g,
            ) from None
        choice.update(solved.choice)
        group_objectives[g] = solved.objective
        statuses.append(solved.status)
        solver_seconds += solved.solver_seconds
        gaps.append(solved.mip_gap)
        optimal = optimal and solved.optimal
    # report layers in the problem's order (free layers, then fixed ones), whatever the group order
    choice = {l.name: choice[l.name] for l in problem.layers} | {f.name: f.bits for f in problem.fixed}
    sizes = {l.name: l.size for l in problem.layers} | {f.name: f.size for f in problem.fixed}
    total_bits, avg = _avg(choice, sizes, sizes)
    group_bits = {}
    for g in budgets:
        names = [l.name for l in problem.layers if l.group == g] + [f.name for f in problem.fixed if f.group == g]
        group_bits[g] = _avg(choice, sizes, names)[1]
    status = next((s for s in statuses if s != "Optimal"), "Optimal")
    return Allocation(
        choice=choice,
        status=status,
        objective=float(sum(group_objectives.values())),
        avg_bits=avg,
        seconds=time.perf_counter() - t0,
        solver_seconds=solver_seconds,
        mip_gap=max(gaps) if gaps else 0.0,
        optimal=optimal,
        budget_bits=float(problem.budget_bits),
        mode=problem.mode,
        tolerance=float(problem.tolerance),
        total_bits=total_bits,
        fixed=frozenset(f.name for f in problem.fixed),
        k=None if isinstance(k, Mapping) else float(k),
        ratios=ratios,
        group_budgets=budgets,
        group_bits=group_bits,
        group_objectives=group_objectives,
    )


def sweep(
    problem: AllocationProblem,
    ks: Iterable[float | Mapping[str, float]] = (1.0,),
    budgets: Iterable[float] | None = None,
    *,
    content_group: str = "content",
    unique: bool = True,
    skip_infeasible: bool = True,
    time_limit: float | None = 60.0,
    mip_rel_gap: float = 0.0,
    mip_abs_gap: float = 1e-6,
    sub_mip_heuristics: bool = False,
    warm_start: bool = True,
) -> list[Allocation]:
    """Per-group allocations for every budget ``B`` in ``budgets`` (default: the problem's) and ratio ``k``.

    Candidates come back in sweep order (budgets outer, ``k`` inner), each carrying its ``budget_bits`` and ``k``.

    Args:
        ks: ratios ``b_content / b_other`` (or ratio mappings), as for :func:`solve_groups`.
        budgets: average-bits budgets to sweep; ``None`` uses ``problem.budget_bits`` alone.
        unique: drop a candidate whose choice equals an earlier one (image evaluation is the expensive part).
        skip_infeasible: leave out (budget, k) pairs whose group budgets cannot be met; with ``False`` the first
            one raises :class:`BudgetInfeasibleError`.
        time_limit, mip_rel_gap, mip_abs_gap, sub_mip_heuristics, warm_start: solver settings, as in
            :func:`solve`.

    Raises:
        BudgetInfeasibleError: every pair was infeasible (or, with ``skip_infeasible=False``, any was); the message
            lists them.
    """
    _Options(time_limit, mip_rel_gap, mip_abs_gap, sub_mip_heuristics, warm_start)  # fail early on bad settings
    budget_list = [problem.budget_bits] if budgets is None else [float(b) for b in budgets]
    k_list = list(ks)
    if not budget_list or not k_list:
        raise AllocationError("sweep needs at least one budget and one ratio k.")
    out: list[Allocation] = []
    seen: set[tuple] = set()
    failures: list[BudgetInfeasibleError] = []
    for b in budget_list:
        for k in k_list:
            try:
                alloc = solve_groups(
                    problem.with_budget(b),
                    k,
                    content_group=content_group,
                    time_limit=time_limit,
                    mip_rel_gap=mip_rel_gap,
                    mip_abs_gap=mip_abs_gap,
                    sub_mip_heuristics=sub_mip_heuristics,
                    warm_start=warm_start,
                )
            except BudgetInfeasibleError as e:
                if not skip_infeasible:
                    raise
                failures.append(e)
                continue
            key = tuple(sorted(alloc.choice.items()))
            if unique and key in seen:
                continue
            seen.add(key)
            out.append(alloc)
    if not out:
        first = failures[0]
        raise BudgetInfeasibleError(
            f"None of the {len(failures)} (budget, k) combinations is reachable; the first: {first}",
            budget=first.budget,
            smallest=first.smallest,
            largest=first.largest,
            group=first.group,
        )
    return out


def pick(candidates: Sequence[Allocation], evaluate: Callable[[Allocation], float]) -> Allocation:
    """The candidate for which ``evaluate`` returns the lowest value (e.g. image MSE against FP).

    ``evaluate`` is called once per candidate, in order; ties go to the earlier candidate. NaN counts as worse
    than any number.

    Raises:
        AllocationError: no candidates, or ``evaluate`` returned NaN for all of them.
    """
    candidates = list(candidates)
    if not candidates:
        raise AllocationError("pick needs at least one candidate allocation.")
    best, best_value = None, math.inf
    for c in candidates:
        value = float(evaluate(c))
        if math.isnan(value):
            continue
        if best is None or value < best_value:
            best, best_value = c, value
    if best is None:
        raise AllocationError("evaluate returned NaN for every candidate; cannot pick one.")
    return best
