"""The ``"highs"`` allocator: one group's widths by an exact integer program, solved with HiGHS (``highspy``).

The formulation (:func:`formulate`) is kept apart from the solver calls: one binary column per (layer, candidate
width), one assignment row per layer (``sum_b x[l, b] = 1``) and one budget row on the average width. The objective
is the score lost against each layer's best candidate (same optimum as maximising the score; the MIP gap is then
relative to what is traded away). HiGHS is warm-started from a greedy allocation (:func:`_greedy_start`) and by
default runs to proven optimality; a 1,000-layer x 3-width problem solves in well under a second
(``benchmarks/ilp_speed.py``).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np

from .allocators import ALLOCATORS, GroupProblem, SolverOptions
from .problem import VERIFY_SLACK, AllocationError
from .result import Solved, as_width


@dataclass
class Formulation:
    """The ILP's arrays. Column ``j`` is layer ``owner[j]`` at width ``bits[j]``; a layer's columns start at
    ``starts[layer]`` (sorted by width); ``coef`` are the budget row's coefficients (``b * w / W``), ``loss`` the
    objective; the budget row is bounded by ``[row_lo, row_hi]`` (the fixed layers' share ``fixed_avg`` taken off)."""

    starts: np.ndarray
    owner: np.ndarray
    bits: np.ndarray
    score: np.ndarray
    size: np.ndarray
    loss: np.ndarray
    coef: np.ndarray
    total: float
    fixed_avg: float
    row_lo: float
    row_hi: float

    @property
    def columns(self) -> int:
        return int(self.starts[-1])

    @property
    def rows(self) -> int:
        """Assignment rows (one per layer); the budget row comes after them."""
        return len(self.starts) - 1


def formulate(problem: GroupProblem, inf: float) -> Formulation:
    """The ILP of ``problem`` as arrays (``inf``: the solver's infinity, for the open side of an at-most row)."""
    layers, fixed = problem.layers, problem.fixed
    total = float(sum(l.size for l in layers) + sum(f.size for f in fixed))
    fixed_avg = sum(f.size * f.bits for f in fixed) / total
    widths = [sorted(l.scores) for l in layers]
    counts = np.fromiter((len(w) for w in widths), dtype=np.int64, count=len(layers))
    starts = np.zeros(len(layers) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    n = int(starts[-1])
    bits = np.fromiter((b for w in widths for b in w), dtype=np.float64, count=n)
    score = np.fromiter((l.scores[b] for l, w in zip(layers, widths) for b in w), dtype=np.float64, count=n)
    owner = np.repeat(np.arange(len(layers)), counts)
    size = np.fromiter((l.size for l in layers), dtype=np.float64, count=len(layers))
    best = np.maximum.reduceat(score, starts[:-1])
    budget, tol = problem.budget, problem.tolerance
    if problem.mode == "at_most":
        row_lo, row_hi = -inf, budget - fixed_avg
    else:
        row_lo, row_hi = budget - tol - fixed_avg, budget + tol - fixed_avg
    return Formulation(starts, owner, bits, score, size, best[owner] - score, bits * size[owner] / total, total,
                       fixed_avg, row_lo, row_hi)


def _highs(options: SolverOptions):
    import highspy

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
    return h


def _load(h, f: Formulation, warm_start: bool) -> None:
    """Columns, the assignment rows and the budget row into HiGHS, and the greedy start when asked for."""
    n, m = f.columns, f.rows
    h.addCols(n, f.loss, np.zeros(n), np.ones(n), 0, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0))
    h.changeColsIntegrality(n, np.arange(n, dtype=np.int32), np.ones(n, dtype=np.uint8))  # kInteger
    lower = np.concatenate([np.ones(m), [f.row_lo]])
    upper = np.concatenate([np.ones(m), [f.row_hi]])
    row_starts = np.concatenate([f.starts[:-1], [n]]).astype(np.int32)
    index = np.concatenate([np.arange(n), np.arange(n)]).astype(np.int32)
    value = np.concatenate([np.ones(n), f.coef])
    h.addRows(m + 1, lower, upper, 2 * n, row_starts, index, value)
    if warm_start:
        start = _greedy_start(f.starts, f.owner, f.coef, f.loss, f.row_lo, f.row_hi)
        if start is not None:  # HiGHS checks it and ignores it if it is not feasible
            x0 = np.zeros(n)
            x0[start] = 1.0
            h.setSolution(n, np.arange(n, dtype=np.int32), x0)


@ALLOCATORS.register("highs")
def solve_highs(problem: GroupProblem, options: SolverOptions) -> Solved:
    """The exact allocation of one group (see the module docstring)."""
    import highspy

    f = formulate(problem, highspy.kHighsInf)
    h = _highs(options)
    _load(h, f, options.warm_start)
    t0 = time.perf_counter()
    h.run()
    solver_seconds = time.perf_counter() - t0
    model_status = h.getModelStatus()
    status = h.modelStatusToString(model_status)
    info = h.getInfo()
    if model_status == highspy.HighsModelStatus.kInfeasible:
        raise problem.infeasible_error()
    if int(info.primal_solution_status) != int(highspy.kSolutionStatusFeasible):
        where = f" for group {problem.group!r}" if problem.group is not None else ""
        raise AllocationError(
            f"HiGHS found no allocation{where} ({status}) for a {problem.budget:g}-bit budget; raise time_limit "
            f"(was {options.time_limit}) or loosen mip_rel_gap."
        )
    pick = _chosen_columns(f, np.asarray(h.getSolution().col_value, dtype=np.float64))
    _verify(problem, f, pick)
    optimal = model_status == highspy.HighsModelStatus.kOptimal
    gap = _gap(float(info.mip_gap), optimal, status)
    choice = {l.name: as_width(f.bits[j]) for l, j in zip(problem.layers, pick)}
    return Solved(choice, status, float(np.sum(f.score[pick])), solver_seconds, gap, optimal)


def _chosen_columns(f: Formulation, x: np.ndarray) -> np.ndarray:
    """The largest x of each layer is its chosen width (robust to values like 0.9999999)."""
    s = f.starts
    return np.array([s[i] + int(np.argmax(x[s[i] : s[i + 1]])) for i in range(f.rows)], dtype=np.int64)


def _verify(problem: GroupProblem, f: Formulation, pick: np.ndarray) -> None:
    """Guards against rounding a fractional solution (should never trigger)."""
    avg = f.fixed_avg + float(np.sum(f.bits[pick] * f.size)) / f.total
    ok = avg <= f.row_hi + f.fixed_avg + VERIFY_SLACK and (
        problem.mode == "at_most" or avg >= f.row_lo + f.fixed_avg - VERIFY_SLACK
    )
    if not ok:
        raise AllocationError(
            f"HiGHS returned an allocation averaging {avg:.6f} bits, outside the budget {problem.budget:g} "
            f"({problem.mode}, tolerance {problem.tolerance:g}); this is a bug, please report it."
        )


def _gap(gap: float, optimal: bool, status: str) -> float:
    """HiGHS's MIP gap (finite), warning when the solve stopped before proving optimality."""
    if not math.isfinite(gap):  # HiGHS reports an infinite gap when the objective and its bound are both ~0
        gap = 0.0 if optimal else math.inf
    if not optimal:
        warnings.warn(
            f"HiGHS stopped before proving optimality ({status}, MIP gap {gap:.3g}); the allocation is feasible "
            "but may not be the best. Raise time_limit for an exact one.",
            RuntimeWarning,
            stacklevel=4,
        )
    return gap


def _greedy_start(
    starts: np.ndarray, owner: np.ndarray, coef: np.ndarray, loss: np.ndarray, row_lo: float, row_hi: float
) -> np.ndarray | None:
    """A feasible starting allocation for HiGHS: the chosen column of every layer, or ``None`` if none was found.

    The Lagrangian relaxation of the budget row is solved by bisection on its multiplier (each layer then picks
    ``argmin loss + lam * coef``; the smallest ``lam`` that fits under ``row_hi``), and the room left is filled
    greedily, best loss saved per unit of budget first. Handing HiGHS this near-optimal incumbent lets it fix most
    columns by reduced cost right after the root LP. Ties go to the narrower width.
    """
    pick = _lagrangian_pick(starts, owner, coef, loss, row_hi)
    if pick is None:
        return None
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




def _lagrangian_pick(
    starts: np.ndarray, owner: np.ndarray, coef: np.ndarray, loss: np.ndarray, row_hi: float
) -> np.ndarray | None:
    """Each layer's column minimising ``loss + lam * coef`` for the smallest ``lam`` (bisection) that fits under
    ``row_hi``; ``None`` when no multiplier makes it fit."""
    head = starts[:-1]

    def choose(lam):
        order = np.lexsort((loss + lam * coef, owner))
        return order[head]

    pick = choose(0.0)
    if coef[pick].sum() <= row_hi:
        return pick
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
    return choose(hi)
