"""The same-size uniform plan inside a mixed build: as the context sensitivities are measured in, and as a candidate
of the final pick.

* ``context="uniform"`` (:func:`uniform_sensitivity`): every layer is measured at each candidate width with every
  other candidate layer at the **base width** (:func:`base_width`, e.g. int4, activations as the plan quantizes
  them) instead of full precision, so how a layer's error compounds with the rest of the quantized model is seen.
  The layer at the base width *is* the uniform model: that score is measured once, and a layer's score is its
  change against it. A content layer's widest candidate is estimated from its narrower one (quantization noise
  power falls 4x per extra bit: the layer's damage at the base width is ``(s_base - s_lo) / (4**(base - lo) - 1)``,
  and the widest width removes almost all of it). MixDQ measures in full precision (``context="fp"``).
* ``pick_uniform`` (:func:`uniform_allocation`): the uniform plan at the base width joins the pick's candidates
  when its size is within the budget plus ``tolerance``, so a build never returns a plan that is worse than it
  on the pick prompts.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..plan import BitPlan
from ..plan.spec import DYNAMIC_RANGES
from .allocate import AllocationProblem, BudgetInfeasibleError, FixedLayer, LayerChoice, solve
from .allocate.result import Allocation
from .context import BuildContext
from .recording import Calibration
from .scores import score_key
from .sensitivity import SensitivityResult, applied, layer_sensitivity

#: how sensitivities may be measured: everything else in full precision (MixDQ) or at the uniform base width
CONTEXTS = ("fp", "uniform")
#: the cache key of the uniform model's own score
BASE_KEY = "<uniform>"


def base_width(widths: dict[str, list[int]], weight_bits: float) -> int:
    """The uniform width: the widest candidate every group has that fits ``weight_bits`` (else the narrowest
    common one). The options check that the groups share a candidate when it is needed."""
    common = sorted(set.intersection(*(set(w) for w in widths.values())))
    fitting = [w for w in common if w <= weight_bits + 1e-9]
    return fitting[-1] if fitting else common[0]


def act_entry(s, calib: Calibration, name: str, bits: int | None) -> dict[str, Any]:
    """A layer's activation keys in a plan: unquantized (``None``), dynamic (per tensor or per token), or static
    with its calibrated range."""
    if bits is None:
        return {"activations": "none"}
    if s.activations in DYNAMIC_RANGES:  # "dynamic" (per tensor) or "dynamic-token"
        return {"activations": f"int{bits}", "act_range": s.activations}
    return {"activations": f"int{bits}", "act_range": max(calib.ranges.get(name, 1.0), 1e-6)}


def base_plan(ctx: BuildContext, calib: Calibration) -> BitPlan:
    """Every candidate layer at the base width, activations at the widest candidate (protected layers as they are)."""
    from ..bos import attach_bos

    s = ctx.settings
    bits = base_width(s.widths, s.weight_bits)
    acts = None if s.activations == "none" else max(s.act_widths)
    layers = {n: {"weights": "none", "activations": "none"} for n in ctx.protected}
    layers.update({n: {"weights": f"int{bits}", **act_entry(s, calib, n, acts)} for n in ctx.candidates})
    plan = BitPlan(layers=layers)
    if calib.bos_state is not None:
        plan = attach_bos(plan, calib.bos_state)
    return plan.resolve(ctx.denoiser)


def uniform_sensitivity(ctx: BuildContext, calib: Calibration, common: dict) -> SensitivityResult:
    """Weight scores of every candidate layer measured in the uniform model (see the module docstring); the base
    width and extrapolated widths are filled in by :func:`complete`."""
    s = ctx.settings
    base = base_width(s.widths, s.weight_bits)
    widths = {g: [w for w in sorted(set(ws)) if w != base] for g, ws in s.widths.items()}
    for g, (widest, _) in extrapolated_widths(ctx).items():
        widths[g].remove(widest)
    plan = base_plan(ctx, calib)
    specs = plan.layer_specs()
    originals = {n: ctx.denoiser.get_submodule(n) for n in ctx.candidates}
    with applied(ctx.denoiser, plan, calib.bos_state):
        sens = layer_sensitivity(ctx.denoiser, ctx.candidates, widths, ctx.groups,
                                 lambda n, b: replace(specs[n], weights=f"int{b}"), kind="weights",
                                 module_of=originals.__getitem__, **common)
        for group in set(ctx.groups[n] for n in ctx.candidates):
            _base_score(ctx, sens, common, group, base)
    return sens


def _base_score(ctx: BuildContext, sens: SensitivityResult, common: dict, group: str, base: int) -> None:
    """The uniform model's score on ``group``'s metric (measured once, cached like a layer's)."""
    from .sensitivity import _job_cost, _score

    cache, key = common["cache"], score_key(f"{BASE_KEY}{group}", base)
    cost = _job_cost(group, common["quality_rec"], common["content"])
    if cache.get(key) is None:
        cache.put(key, _score(ctx.denoiser, group, common["quality_rec"], common["content"]))
        sens.cost.add(*cost)
    else:
        sens.reused.add(*cost)


def extrapolated_widths(ctx: BuildContext) -> dict[str, tuple[int, int]]:
    """``{group: (widest, from)}`` for content layers whose widest width is estimated from a narrower one below
    the base width (with ``extrapolate_widest``)."""
    s = ctx.settings
    base = base_width(s.widths, s.weight_bits)
    ws = sorted(set(s.widths.get("content", [])))
    below = [w for w in ws if w < base]
    if not s.extrapolate_widest or not below or ws[-1] <= base:
        return {}
    return {"content": (ws[-1], below[-1])}


def complete(ctx: BuildContext, sens: SensitivityResult, cache) -> None:
    """Fill in every layer's base-width score (the uniform model's) and its extrapolated widest width."""
    s = ctx.settings
    base = base_width(s.widths, s.weight_bits)
    extrapolated = extrapolated_widths(ctx)
    for name in ctx.candidates:
        group = ctx.groups[name]
        scores = sens.scores[name]
        scores[base] = cache.get(score_key(f"{BASE_KEY}{group}", base))
        if group in extrapolated:
            widest, lo = extrapolated[group]
            damage = max(scores[base] - scores[lo], 0.0) / (4 ** (base - lo) - 1)
            scores[widest] = scores[base] + damage * (1 - 4.0 ** (base - widest))


def uniform_allocation(ctx: BuildContext) -> Allocation | None:
    """The uniform plan at the base width as an allocation (``None`` when it is over the budget plus ``tolerance``:
    int4 everywhere but 16-bit first/last layers averages a little over 4 bits)."""
    s, table, groups = ctx.settings, ctx.table, ctx.groups
    bits = base_width(s.widths, s.weight_bits)
    problem = AllocationProblem(
        layers=[LayerChoice(n, table[n].numel, groups[n], {bits: 0.0}) for n in ctx.candidates],
        budget_bits=s.weight_bits + s.tolerance, tolerance=s.tolerance, mode="at_most",
        fixed=[FixedLayer(n, table[n].numel, 16, groups[n]) for n in ctx.protected],
    )
    try:
        return solve(problem, allocator=s.allocator)
    except BudgetInfeasibleError:
        return None
