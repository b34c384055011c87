"""Solving an allocation problem: jointly (:func:`solve`), or per group with the budget split between groups by a
ratio ``k`` (:func:`group_budgets`, :func:`solve_groups`), each group solved by a registered allocator."""

from __future__ import annotations

import time
from typing import Mapping

from .allocators import DEFAULT_ALLOCATOR, GroupProblem, SolverOptions, solve_group
from .problem import AllocationError, AllocationProblem, BudgetInfeasibleError, finite, validate, value_range
from .result import Allocation, Solved, average


def solve(problem: AllocationProblem, *, allocator: str = DEFAULT_ALLOCATOR, **options) -> Allocation:
    """Solve the allocation ILP jointly over all layers, ignoring groups.

    Every score must be on one scale: with SSIM-scored and dB-scored layers in one problem the dB layers would win
    every trade. Use :func:`solve_groups` (or :func:`sweep`) for MixDQ's per-group solve.

    Args:
        problem: layers, fixed layers and the budget.
        allocator: the :data:`~.allocators.ALLOCATORS` entry that solves it (default ``"highs"``, the ILP); the
            solver options below are HiGHS's, other allocators use those that apply to them.
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
    settings = SolverOptions(**options)
    validate(problem)
    t0 = time.perf_counter()
    whole = GroupProblem(problem.layers, problem.fixed, float(problem.budget_bits), float(problem.tolerance),
                         problem.mode, None)
    solved = solve_group(whole, settings, allocator)
    groups: dict[str, list[str]] = {}
    for l in problem.layers:
        groups.setdefault(l.group, []).append(l.name)
    for f in problem.fixed:
        if f.group is not None:
            groups.setdefault(f.group, []).append(f.name)
    objectives = {g: float(sum(l.scores[solved.choice[l.name]] for l in problem.layers if l.group == g))
                  for g in problem.groups}
    return _allocation(problem, solved.choice, [solved], t0, groups, objectives, solved.objective)


def _allocation(problem: AllocationProblem, choice: dict[str, float], parts: list[Solved], t0: float,
                groups: dict[str, list[str]], objectives: dict[str, float], objective: float, **split) -> Allocation:
    """The :class:`Allocation` of ``choice``, from the allocator calls ``parts`` that made it; ``groups`` names each
    group's layers (fixed ones included) for its achieved width, ``split`` the per-group budget fields."""
    sizes = {l.name: l.size for l in problem.layers} | {f.name: f.size for f in problem.fixed}
    total_bits, avg = average(choice, sizes, sizes)
    return Allocation(
        choice=choice,
        status=next((p.status for p in parts if p.status != "Optimal"), "Optimal"),
        objective=objective,
        avg_bits=avg,
        seconds=time.perf_counter() - t0,
        solver_seconds=sum(p.solver_seconds for p in parts),
        mip_gap=max((p.mip_gap for p in parts), default=0.0),
        optimal=all(p.optimal for p in parts),
        budget_bits=float(problem.budget_bits),
        mode=problem.mode,
        tolerance=float(problem.tolerance),
        total_bits=total_bits,
        fixed=frozenset(f.name for f in problem.fixed),
        group_bits={g: average(choice, sizes, names)[1] for g, names in groups.items()},
        group_objectives=objectives,
        **split,
    )


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
        if not finite(r) or r <= 0:
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
    validate(problem)
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
        lo, hi = value_range(problem.layers, problem.fixed)
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
    allocator: str = DEFAULT_ALLOCATOR,
    **options,
) -> Allocation:
    """Solve each group on its own, with the budget split between groups by :func:`group_budgets`.

    Each group ``g`` gets the ILP over its own layers with budget ``b_g`` (band ``b_g ± tolerance`` or at most
    ``b_g``, over the group's layers and its fixed layers), so the overall average is ``B ± tolerance`` (or at
    most ``B``). Fixed layers outside every allocated group count only in the overall average.

    Args:
        k: ``b_content / b_other`` for two groups, or a mapping group -> relative width.
        content_group: the group ``k`` multiplies (MixDQ: ``"content"``).
        allocator, time_limit, mip_rel_gap, mip_abs_gap, sub_mip_heuristics, warm_start: the allocator and its
            settings for every group, as in :func:`solve`.

    Raises:
        BudgetInfeasibleError: a group's budget cannot be met; the message names the group, its budget and its
            reachable range (the exception's ``group`` attribute too).
    """
    settings = SolverOptions(**options)
    validate(problem)
    t0 = time.perf_counter()
    budgets = group_budgets(problem, k, content_group=content_group)
    ratios = _ratios_for(problem, k, content_group)
    parts = {g: _solve_one_group(problem, g, b_g, k, settings, allocator) for g, b_g in budgets.items()}
    choice: dict[str, float] = {}
    for solved in parts.values():
        choice.update(solved.choice)
    # report layers in the problem's order (free layers, then fixed ones), whatever the group order
    choice = {l.name: choice[l.name] for l in problem.layers} | {f.name: f.bits for f in problem.fixed}
    groups = {g: [l.name for l in problem.layers if l.group == g] + [f.name for f in problem.fixed if f.group == g]
              for g in budgets}
    objectives = {g: solved.objective for g, solved in parts.items()}
    return _allocation(problem, choice, list(parts.values()), t0, groups, objectives, float(sum(objectives.values())),
                       k=None if isinstance(k, Mapping) else float(k), ratios=ratios, group_budgets=budgets)


def _solve_one_group(problem: AllocationProblem, g: str, b_g: float, k, settings: SolverOptions,
                     allocator: str) -> Solved:
    """Group ``g``'s layers (and its fixed layers) at its budget ``b_g``; an unreachable budget names the split."""
    layers = [l for l in problem.layers if l.group == g]
    fixed = [f for f in problem.fixed if f.group == g]
    try:
        return solve_group(GroupProblem(layers, fixed, b_g, float(problem.tolerance), problem.mode, g), settings,
                           allocator)
    except BudgetInfeasibleError as e:
        split = f"k={k:g}" if not isinstance(k, Mapping) else f"ratios {dict(k)}"
        raise BudgetInfeasibleError(
            f"{e} (Group {g!r} got {b_g:.3f} bits from the {problem.budget_bits:g}-bit budget split by {split}.)",
            budget=e.budget,
            smallest=e.smallest,
            largest=e.largest,
            group=g,
        ) from None
