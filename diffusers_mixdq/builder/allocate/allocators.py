"""The allocator registry: how the widths of one group of layers are chosen under that group's budget.

:data:`ALLOCATORS` maps a name to a function ``allocate(problem: GroupProblem, options: SolverOptions) -> Solved``.
Splitting the budget between groups (:mod:`.groups`), sweeping ``k`` / ``B`` and picking a candidate
(:mod:`.sweep`) are the same for every allocator; only the choice inside one group differs. The one registered
today is ``"highs"`` (:mod:`.ilp`, the exact integer program); it is the default of :func:`~.groups.solve`,
:func:`~.groups.solve_groups`, :func:`~.sweep.sweep`, ``BuildSettings.allocator`` and a recipe's ``allocator:``.

To add one, register a function (importing its module before the build, e.g. from your own package)::

    from diffusers_mixdq.builder.allocate import ALLOCATORS, GroupProblem, Solved, SolverOptions

    @ALLOCATORS.register("greedy")
    def greedy(problem: GroupProblem, options: SolverOptions) -> Solved:
        choice = ...  # one width per layer of problem.layers, from each layer's scores
        return Solved(choice, "Optimal", objective, solver_seconds=0.0, mip_gap=0.0, optimal=False)

then build with ``BuildSettings(..., allocator="greedy")`` or ``allocator: greedy`` in a recipe. An allocator is
only called with at least one free layer and a budget inside the reachable range (:func:`solve_group` checks
both); ``choice`` names every free layer (fixed layers are added for it). It raises
``problem.infeasible_error()`` when no choice meets the budget and :class:`~.problem.AllocationError` when it fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ...registry import Registry
from .problem import (
    EPS,
    AllocationError,
    BudgetInfeasibleError,
    FixedLayer,
    LayerChoice,
    finite,
    infeasible_message,
    value_range,
)
from .result import Solved


@dataclass(frozen=True)
class SolverOptions:
    """Solver settings shared by :func:`solve`, :func:`solve_groups` and :func:`sweep` (see :func:`solve`); an
    allocator uses those that apply to it."""

    time_limit: float | None = 60.0
    mip_rel_gap: float = 0.0
    mip_abs_gap: float = 1e-6
    sub_mip_heuristics: bool = False
    warm_start: bool = True

    def __post_init__(self):
        if self.time_limit is not None and not (finite(self.time_limit) and self.time_limit > 0):
            raise AllocationError(
                f"time_limit must be a positive number of seconds or None, got {self.time_limit!r}."
            )
        for name in ("mip_rel_gap", "mip_abs_gap"):
            value = getattr(self, name)
            if not finite(value) or value < 0:
                raise AllocationError(f"{name} must be a non-negative number, got {value!r}.")


@dataclass(frozen=True)
class GroupProblem:
    """One budgeted choice: ``layers`` to allocate, ``fixed`` layers counting towards the average, the average
    ``budget`` (band ``budget ± tolerance`` or at most ``budget``, per ``mode``) and the group's name."""

    layers: Sequence[LayerChoice]
    fixed: Sequence[FixedLayer]
    budget: float
    tolerance: float
    mode: str
    group: str | None = None

    @property
    def reachable(self) -> tuple[float, float]:
        """The smallest and largest average width the candidates and fixed layers can reach."""
        return value_range(self.layers, self.fixed)

    def infeasible_error(self) -> BudgetInfeasibleError:
        lo, hi = self.reachable
        return BudgetInfeasibleError(
            infeasible_message(self.budget, lo, hi, self.mode, self.tolerance, self.group),
            budget=self.budget, smallest=lo, largest=hi, group=self.group,
        )

    def check_reachable(self) -> None:
        """Raise :meth:`infeasible_error` when the budget lies outside the reachable range."""
        lo, hi = self.reachable
        scale = max(abs(self.budget), 1.0) * EPS
        if self.mode == "at_most":
            infeasible = self.budget < lo - scale
        else:
            infeasible = self.budget + self.tolerance < lo - scale or self.budget - self.tolerance > hi + scale
        if infeasible:
            raise self.infeasible_error()


Allocator = Callable[[GroupProblem, SolverOptions], Solved]

#: allocators by name (see the module docstring to add one)
ALLOCATORS: Registry[Allocator] = Registry("allocator")
DEFAULT_ALLOCATOR = "highs"


def solve_group(problem: GroupProblem, options: SolverOptions, allocator: str = DEFAULT_ALLOCATOR) -> Solved:
    """``problem`` solved by the named allocator, after checking that its budget is reachable."""
    allocate = ALLOCATORS.get(allocator)
    problem.check_reachable()
    fixed_choice = {f.name: f.bits for f in problem.fixed}
    if not problem.layers:
        return Solved(fixed_choice, "Optimal", 0.0, 0.0, 0.0, True)
    solved = allocate(problem, options)
    solved.choice.update(fixed_choice)
    return solved
