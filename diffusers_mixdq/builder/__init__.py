"""Build: calibrate -> sense -> allocate, producing plans from a pipeline and prompts."""

from .allocate import (
    Allocation,
    AllocationError,
    AllocationProblem,
    BudgetInfeasibleError,
    FixedLayer,
    LayerChoice,
    achievable_range,
    budget_for_size,
    group_budgets,
    pick,
    solve,
    solve_groups,
    sweep,
)
from .builder import BuildReport, BuildSettings, build_plan, calibrate, calibrated_plan
from .calibrate import record_input_ranges

__all__ = [
    "Allocation",
    "AllocationError",
    "AllocationProblem",
    "BudgetInfeasibleError",
    "BuildReport",
    "BuildSettings",
    "FixedLayer",
    "LayerChoice",
    "achievable_range",
    "budget_for_size",
    "group_budgets",
    "build_plan",
    "calibrate",
    "calibrated_plan",
    "pick",
    "record_input_ranges",
    "solve",
    "solve_groups",
    "sweep",
]
