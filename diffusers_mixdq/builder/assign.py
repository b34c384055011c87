"""The allocate stage: widths from the sensitivities (the arithmetic is :mod:`.allocate`'s; this is orchestration).

Weights: one problem over the candidate layers (protected ones fixed at 16 bits), solved per group for every split
ratio ``k`` (:func:`~.allocate.sweep`); each candidate is applied in memory and the one whose images are closest
to full precision is kept (:func:`~.allocate.pick`): images of the pick prompts (``pick_prompts``, held out from
calibration; default the calibration prompts), compared per image by MSE and summed up by ``pick_objective`` (the
mean, or the mean of the worst images: :func:`~.allocate.objective`). Activations: the most activation-sensitive inputs stay
unquantized, the rest share an element-weighted budget (one per-group solve, ``k = 1``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..plan import BitPlan
from .allocate import AllocationProblem, FixedLayer, LayerChoice, objective, pick, solve_groups, sweep
from .allocate.result import Allocation
from .context import BuildContext
from .measure import Sensitivities
from .plan_errors import image_errors
from .recording import Calibration
from .settings import BuildSettings, run_pipeline
from .uniform_context import act_entry, uniform_allocation
from .width_ladder import damage as score_damage


@dataclass
class Assignment:
    """What the allocate stage gives: the chosen weight allocation and its plan, the candidates it was picked
    from (with their mean image MSE on the pick prompts), and each layer's activation width (``None``: kept
    unquantized)."""

    best: Allocation
    plan: BitPlan
    candidates: list[Allocation]
    candidate_mse: list[float]
    activations: dict[str, int | None] = field(default_factory=dict)
    #: the chosen allocation's plans of other components (text encoders, :mod:`.plan_set`), by component
    components: dict[str, BitPlan] = field(default_factory=dict)
    #: the full-precision images of the pick prompts, and the chosen plan's per-image MSE to them
    reference: torch.Tensor | None = None
    best_errors: list[float] = field(default_factory=list)
    #: what the refine stage did (:mod:`.refine`; empty when it is off)
    refine: dict = field(default_factory=dict)


BITS_TO_DTYPE = {8: "int8", 6: "int6", 5: "int5", 4: "int4", 3: "int3", 2: "int2", 16: "none"}


def to_plan(ctx: BuildContext, calib: Calibration, allocation: Allocation, acts: dict[str, int | None]) -> BitPlan:
    """The resolved plan of a weight ``allocation`` and activation widths ``acts`` (protected layers at 16 bits)."""
    from ..bos import attach_bos

    layers = {n: {"weights": BITS_TO_DTYPE[int(allocation.choice.get(n, 16))],
                  **act_entry(ctx.settings, calib, n, acts[n])} for n in ctx.table}
    plan = BitPlan(layers=layers)
    if calib.bos_state is not None:
        plan = attach_bos(plan, calib.bos_state)
    return plan.resolve(ctx.denoiser)


def _solver_record(a: Allocation, *keys: str) -> dict:
    return {key: getattr(a, key) for key in keys}


def most_sensitive(scores: dict[str, float], groups: dict[str, str], metric: dict[str, str], count: int) -> list[str]:
    """The ``count`` layers whose score hurts most. Groups are scored on different scales, so each layer's damage
    (:func:`~.width_ladder.damage`: noise power relative to the signal for SQNR in dB, 1 - SSIM, the MSE) is taken
    relative to the mean damage of its group before ranking across groups."""
    damage = {n: score_damage(v, metric[groups[n]]) for n, v in scores.items()}
    mean = {g: sum(d for n, d in damage.items() if groups[n] == g) / max(1, sum(groups[n] == g for n in damage))
            for g in set(groups[n] for n in damage)}
    relative = {n: d / mean[groups[n]] if mean[groups[n]] > 0 else 0.0 for n, d in damage.items()}
    return sorted(relative, key=lambda n: (-relative[n], n))[:count]


def weight_candidates(ctx: BuildContext, sens: Sensitivities, extra: Sequence[LayerChoice] = ()) -> list[Allocation]:
    """Per-group weight allocations over the split ratios (solver statistics into the report); ``extra``: layers
    of other components allocated under the same budget (a joint plan set, :mod:`.plan_set`)."""
    s, table, groups = ctx.settings, ctx.table, ctx.groups
    scores = sens.weights.scores
    problem = AllocationProblem(
        layers=[LayerChoice(n, table[n].numel, groups[n], scores[n] or {w: 0.0 for w in s.widths[groups[n]]})
                for n in ctx.candidates] + list(extra),
        budget_bits=s.weight_bits,
        tolerance=s.tolerance,
        mode=s.budget_mode,
        fixed=[FixedLayer(n, table[n].numel, 16, groups[n]) for n in ctx.protected],
    )
    allocations = sweep(problem, ks=s.split_ratios, allocator=s.allocator)
    uniform = uniform_allocation(ctx) if s.pick_uniform else None
    if uniform is not None and all(a.choice != uniform.choice for a in allocations):
        allocations.append(uniform)  # last: a tie goes to a mixed candidate
    ctx.report.solver = [_solver_record(a, "k", "status", "objective", "avg_bits", "seconds", "mip_gap")
                         for a in allocations]
    return allocations


def activation_widths(ctx: BuildContext, calib: Calibration, sens: Sensitivities) -> dict[str, int | None]:
    """Each layer's activation width; ``None`` for unquantized inputs (protected or most sensitive layers, or no
    activation quantization at all)."""
    s, act = ctx.settings, sens.activations
    choice: dict[str, int | None] = {n: None for n in ctx.table}
    if s.activations == "none":
        return choice
    widest = max(s.act_widths)
    kept = []
    if s.act_protect and act is not None:
        kept = most_sensitive({n: act.scores[n][widest] for n in ctx.candidates}, ctx.groups, act.metric,
                              s.act_protect)
    free = [n for n in ctx.candidates if n not in kept]
    if act is None or len(set(s.act_widths)) == 1:
        choice.update({n: widest for n in free})
        return choice
    problem = AllocationProblem(
        layers=[LayerChoice(n, max(calib.elements.get(n, 0.0), 1.0), ctx.groups[n], act.scores[n]) for n in free],
        budget_bits=s.act_bits if s.act_bits is not None else widest, tolerance=s.tolerance, mode="at_most",
    )
    alloc = solve_groups(problem, k=1.0, allocator=s.allocator)
    choice.update({n: int(b) for n, b in alloc.choice.items()})
    ctx.report.activation_solver = [_solver_record(alloc, "status", "objective", "avg_bits", "seconds", "mip_gap",
                                                   "group_bits")]
    return choice


def pick_reference(ctx: BuildContext, calib: Calibration) -> torch.Tensor:
    """The full-precision images the pick compares with: the calibration run's, or (with ``pick_prompts``) one
    more full-precision run over the pick prompts, counted in the report as ``pick_reference``."""
    s = ctx.settings
    if not s.pick_prompts:
        return calib.recording.images
    with torch.no_grad():
        images = run_pipeline(ctx.pipe, s.pick_settings)
    ctx.report.count("pick_reference", *pick_cost(calib, s))
    return images


def pick_cost(calib: Calibration, s: BuildSettings) -> tuple[int, int]:
    """``(denoiser calls, sample-evaluations)`` of one generation over the pick prompts: the calibration run's,
    with the samples scaled by the number of prompts (one batch, so as many calls)."""
    rec = calib.recording
    return rec.num_calls, rec.num_samples * len(s.pick_settings.prompts) // len(s.prompts)


def assign(ctx: BuildContext, calib: Calibration, sens: Sensitivities, others=None) -> Assignment:
    """Allocate weights and activations, then keep the weight candidate the pick objective likes best (see the
    module docstring). Records times, costs, each candidate's mean MSE and objective, and solver statistics in
    ``ctx.report``. ``others`` (:class:`~.plan_set.OtherComponents`): layers of other components, allocated
    with the denoiser's (``others.layers``), their plans per allocation (``others.plans``) applied during the pick
    (``others.applied``)."""
    t0 = time.perf_counter()
    s, report = ctx.settings, ctx.report
    allocations = weight_candidates(ctx, sens, others.layers if others is not None else ())
    acts = activation_widths(ctx, calib, sens)
    plans = {id(a): to_plan(ctx, calib, a, acts) for a in allocations}
    other_plans = {id(a): others.plans(a) if others is not None else {} for a in allocations}
    reference = pick_reference(ctx, calib)
    mse_of: dict[int, float] = {}
    errors_of: dict[int, list[float]] = {}
    score_of: dict[int, float] = {}

    def score(allocation: Allocation) -> float:
        also = others.applied(other_plans[id(allocation)]) if others is not None else None
        per_image = errors_of[id(allocation)] = image_errors(ctx, calib, plans[id(allocation)], reference, also)
        mse_of[id(allocation)] = objective(per_image, "mse")
        score_of[id(allocation)] = objective(per_image, s.pick_objective)
        return score_of[id(allocation)]

    best = pick(allocations, score)
    report.candidate_mse = [mse_of[id(a)] for a in allocations]
    report.candidate_score = [score_of[id(a)] for a in allocations]
    report.chosen_k = best.k
    report.seconds["allocate"] = time.perf_counter() - t0
    calls, samples = pick_cost(calib, s)
    report.count("pick", calls * len(allocations), samples * len(allocations))
    return Assignment(best, plans[id(best)], allocations, report.candidate_mse, acts, other_plans[id(best)],
                      reference, errors_of[id(best)])
