"""The allocation problem: layers with candidate widths and scores, fixed layers, a budget; checks and budget
arithmetic shared by every allocator (see :mod:`diffusers_mixdq.builder.allocate` for the formulation)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import numpy as np

from ...errors import MixDQError

Mode = Literal["band", "at_most"]
MODES = ("band", "at_most")

#: bytes per unit accepted by :func:`budget_for_size` and :meth:`Allocation.size`
SIZE_UNITS: dict[str, int] = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}

#: relative slack (of the average width) used when checking budgets and solutions in floating point
EPS = 1e-9
#: slack (in average bits) allowed between the solver's solution and the budget when verifying it afterwards
VERIFY_SLACK = 1e-6


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



# --------------------------------------------------------------------------------------------------------------
# validation and budget arithmetic


def unit_bytes(unit: str) -> int:
    try:
        return SIZE_UNITS[unit]
    except KeyError:
        raise AllocationError(f"Unknown size unit {unit!r}; use one of {', '.join(SIZE_UNITS)}.") from None


def fmt_bits(b: float) -> str:
    return f"{b:g}"


def finite(x: float) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(float(x))


def validate(problem: AllocationProblem) -> None:
    if problem.mode not in MODES:
        raise AllocationError(f"Unknown allocation mode {problem.mode!r}; use 'band' or 'at_most'.")
    if not finite(problem.budget_bits) or problem.budget_bits <= 0:
        raise AllocationError(f"The budget must be a positive number of bits, got {problem.budget_bits!r}.")
    if not finite(problem.tolerance) or problem.tolerance < 0:
        raise AllocationError(f"The tolerance must be a non-negative number of bits, got {problem.tolerance!r}.")
    seen: set[str] = set()
    for layer in list(problem.layers) + list(problem.fixed):
        if layer.name in seen:
            raise AllocationError(f"Layer {layer.name!r} appears more than once (names must be unique).")
        seen.add(layer.name)
        if not finite(layer.size) or layer.size <= 0:
            raise AllocationError(f"Layer {layer.name!r} has size {layer.size!r}; sizes must be positive numbers.")
    for f in problem.fixed:
        if not finite(f.bits) or f.bits <= 0:
            raise AllocationError(f"Fixed layer {f.name!r} has width {f.bits!r}; widths must be positive.")
    for layer in problem.layers:
        if not layer.scores:
            raise AllocationError(
                f"Layer {layer.name!r} has no candidate widths; give it scores, or make it a FixedLayer."
            )
        for b, s in layer.scores.items():
            if not finite(b) or b <= 0:
                raise AllocationError(f"Layer {layer.name!r} has candidate width {b!r}; widths must be positive.")
            if not finite(s):
                raise AllocationError(
                    f"Layer {layer.name!r} has score {s!r} at {fmt_bits(b)} bits; scores must be finite "
                    "(drop the candidate instead of scoring it -inf/NaN)."
                )
    if not problem.layers and not problem.fixed:
        raise AllocationError("The allocation problem has no layers.")


def achievable_range(problem: AllocationProblem) -> tuple[float, float]:
    """The smallest and largest size-weighted average width reachable with the candidates and fixed layers."""
    validate(problem)
    return value_range(problem.layers, problem.fixed)


def value_range(layers: Sequence[LayerChoice], fixed: Sequence[FixedLayer]) -> tuple[float, float]:
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
    if not finite(size) or size <= 0:
        raise AllocationError(f"The target size must be a positive number, got {size!r}.")
    total = float(sum(l.size for l in layers) + sum(f.size for f in fixed_layers))
    if total <= 0:
        raise AllocationError("The layers have no size; cannot turn a size in bytes into an average width.")
    available = size * unit_bytes(unit) - other_bytes
    if available <= 0:
        raise AllocationError(
            f"A target of {size:g} {unit} leaves nothing for the layers once other_bytes={other_bytes:g} are taken."
        )
    return available * 8 / total


def infeasible_message(budget: float, lo: float, hi: float, mode: str, tol: float, group: str | None) -> str:
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

