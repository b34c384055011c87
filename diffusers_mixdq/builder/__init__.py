"""The recipe builder: calibrate -> measure -> allocate -> write, producing plans from a pipeline and prompts.

Stages (:mod:`.builder` runs them): :mod:`.calibration`, :mod:`.measure` (:mod:`.sensitivity` scores one layer),
:mod:`.assign` (the allocate stage; the arithmetic and the allocator registry are :mod:`.allocate`),
:mod:`.write`; plan sets with text encoders: :mod:`.plan_set` (:mod:`.text_encoders`, :mod:`.bos_floors`).
What to build: :mod:`.settings` (``BuildSettings``), :mod:`.recipe` (YAML recipes); both are
checked by one model, :mod:`.options`. Sharded builds: :mod:`.distributed`.
"""

from .allocate import (
    ALLOCATORS,
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
from .builder import build_plan, calibrate, calibrated_plan
from .calibration import record_input_ranges
from .distributed import is_main_process
from .plan_set import build_plan_set
from .recipe import load_recipe, run_recipe
from .settings import BuildReport, BuildSettings

__all__ = [
    "ALLOCATORS",
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
    "build_plan_set",
    "calibrate",
    "calibrated_plan",
    "is_main_process",
    "load_recipe",
    "pick",
    "record_input_ranges",
    "run_recipe",
    "solve",
    "solve_groups",
    "sweep",
]
