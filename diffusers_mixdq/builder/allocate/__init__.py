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
likes best (:func:`objective`: the mean or the tail of per-image errors). :func:`budget_for_size` turns a target
size in MB into an average-bits budget.

Modules: :mod:`.problem` (the inputs, their checks, budget arithmetic), :mod:`.allocators` (the registry of
per-group solvers, :data:`ALLOCATORS`, and how to add one), :mod:`.ilp` (``"highs"``, the default: the ILP above
solved exactly by HiGHS, warm-started from a greedy allocation), :mod:`.groups` (joint and per-group solves, the
``k`` split), :mod:`.sweep` (the ``k`` / ``B`` sweep and the pick), :mod:`.result` (:class:`Allocation`).
This package is pure arithmetic: no torch, no pipeline.
"""

from .allocators import ALLOCATORS, DEFAULT_ALLOCATOR, Allocator, GroupProblem, SolverOptions, solve_group
from .groups import group_budgets, solve, solve_groups
from .ilp import solve_highs
from .problem import (
    MODES,
    SIZE_UNITS,
    AllocationError,
    AllocationProblem,
    BudgetInfeasibleError,
    FixedLayer,
    LayerChoice,
    Mode,
    achievable_range,
    budget_for_size,
)
from .result import Allocation, Solved
from .sweep import PICK_OBJECTIVES, TAIL_FRACTION, objective, pick, sweep

__all__ = [
    "ALLOCATORS",
    "DEFAULT_ALLOCATOR",
    "MODES",
    "PICK_OBJECTIVES",
    "SIZE_UNITS",
    "TAIL_FRACTION",
    "Allocation",
    "AllocationError",
    "AllocationProblem",
    "Allocator",
    "BudgetInfeasibleError",
    "FixedLayer",
    "GroupProblem",
    "LayerChoice",
    "Mode",
    "Solved",
    "SolverOptions",
    "achievable_range",
    "budget_for_size",
    "group_budgets",
    "objective",
    "pick",
    "solve",
    "solve_group",
    "solve_groups",
    "solve_highs",
    "sweep",
]
