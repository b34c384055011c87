"""Candidates and the final pick: per-group allocations over a sweep of ``k`` (and ``B``), the candidate a
caller's metric (image MSE against full precision, in the builder) likes best, and the pick objectives that turn
per-image errors into that metric (:func:`objective`)."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

from .allocators import DEFAULT_ALLOCATOR, SolverOptions
from .groups import solve_groups
from .problem import AllocationError, AllocationProblem, BudgetInfeasibleError
from .result import Allocation


def sweep(
    problem: AllocationProblem,
    ks: Iterable[float | Mapping[str, float]] = (1.0,),
    budgets: Iterable[float] | None = None,
    *,
    content_group: str = "content",
    unique: bool = True,
    skip_infeasible: bool = True,
    allocator: str = DEFAULT_ALLOCATOR,
    **options,
) -> list[Allocation]:
    """Per-group allocations for every budget ``B`` in ``budgets`` (default: the problem's) and ratio ``k``.

    Candidates come back in sweep order (budgets outer, ``k`` inner), each carrying its ``budget_bits`` and ``k``.

    Args:
        ks: ratios ``b_content / b_other`` (or ratio mappings), as for :func:`solve_groups`.
        budgets: average-bits budgets to sweep; ``None`` uses ``problem.budget_bits`` alone.
        unique: drop a candidate whose choice equals an earlier one (image evaluation is the expensive part).
        skip_infeasible: leave out (budget, k) pairs whose group budgets cannot be met; with ``False`` the first
            one raises :class:`BudgetInfeasibleError`.
        allocator, time_limit, mip_rel_gap, mip_abs_gap, sub_mip_heuristics, warm_start: the allocator and its
            settings, as in :func:`~.groups.solve`.

    Raises:
        BudgetInfeasibleError: every pair was infeasible (or, with ``skip_infeasible=False``, any was); the message
            lists them.
    """
    SolverOptions(**options)  # fail early on bad settings
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
                alloc = solve_groups(problem.with_budget(b), k, content_group=content_group, allocator=allocator,
                                     **options)
            except BudgetInfeasibleError as e:
                if not skip_infeasible:
                    raise
                failures.append(e)
                continue
            key = tuple(sorted(alloc.choice.items()))
            if not (unique and key in seen):
                seen.add(key)
                out.append(alloc)
    if not out:
        raise _none_reachable(failures)
    return out


def _none_reachable(failures: list[BudgetInfeasibleError]) -> BudgetInfeasibleError:
    first = failures[0]
    return BudgetInfeasibleError(
        f"None of the {len(failures)} (budget, k) combinations is reachable; the first: {first}",
        budget=first.budget, smallest=first.smallest, largest=first.largest, group=first.group,
    )


#: what the final pick may minimise over per-image errors: their mean, the mean of the worst ones, or the mean of
#: their logarithm (``"psnr"``: the mean per-image PSNR, negated; a typical image counts as much as a broken one)
PICK_OBJECTIVES = ("mse", "tail", "psnr")
#: per-image MSE below this counts as this in ``"psnr"`` (an identical image would otherwise be -inf dB)
MIN_MSE = 1e-12
#: the share of images the ``"tail"`` objective averages (the worst ones; at least one image)
TAIL_FRACTION = 0.1


def objective(errors: Sequence[float], kind: str = "mse") -> float:
    """One number from per-image errors (e.g. each image's MSE to full precision): ``"mse"`` their mean,
    ``"tail"`` the mean of the worst ``ceil(TAIL_FRACTION * n)`` of them, ``"psnr"`` the mean of
    ``10·log10(error)`` (minus the mean PSNR of images in [0, 1]). NaN when any error is NaN.

    Raises:
        AllocationError: no errors, or an unknown ``kind``.
    """
    if kind not in PICK_OBJECTIVES:
        raise AllocationError(f"unknown pick objective {kind!r}; one of {', '.join(PICK_OBJECTIVES)}.")
    values = [float(e) for e in errors]
    if not values:
        raise AllocationError("a pick objective needs at least one per-image error.")
    if any(math.isnan(v) for v in values):
        return math.nan
    if kind == "psnr":
        return sum(10 * math.log10(max(v, MIN_MSE)) for v in values) / len(values)
    if kind == "tail":
        values = sorted(values, reverse=True)[: max(1, math.ceil(TAIL_FRACTION * len(values) - 1e-9))]
    return sum(values) / len(values)


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
