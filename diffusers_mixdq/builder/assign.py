"""The allocate stage: widths from the sensitivities (the arithmetic is :mod:`.allocate`'s; this is orchestration).

Weights: one problem over the candidate layers (protected ones fixed at 16 bits), solved per group for every split
ratio ``k`` (:func:`~.allocate.sweep`); each candidate is applied in memory and the one whose images are closest
(MSE) to full precision is kept (:func:`~.allocate.pick`). Activations: the most activation-sensitive inputs stay
unquantized, the rest share an element-weighted budget (one per-group solve, ``k = 1``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..plan import BitPlan
from .allocate import AllocationProblem, FixedLayer, LayerChoice, pick, solve_groups, sweep
from .allocate.result import Allocation
from .context import BuildContext
from .measure import Sensitivities
from .recording import Calibration
from .sensitivity import applied
from .settings import BuildSettings, run_pipeline


@dataclass
class Assignment:
    """What the allocate stage gives: the chosen weight allocation and its plan, the candidates it was picked
    from (with their image MSE), and each layer's activation width (``None``: kept unquantized)."""

    best: Allocation
    plan: BitPlan
    candidates: list[Allocation]
    candidate_mse: list[float]
    activations: dict[str, int | None] = field(default_factory=dict)


BITS_TO_DTYPE = {8: "int8", 4: "int4", 2: "int2", 16: "none"}


def _act_entry(s: BuildSettings, calib: Calibration, name: str, bits: int | None) -> dict[str, Any]:
    if bits is None:
        return {"activations": "none"}
    if s.activations == "dynamic":
        return {"activations": f"int{bits}", "act_range": "dynamic"}
    return {"activations": f"int{bits}", "act_range": max(calib.ranges.get(name, 1.0), 1e-6)}


def to_plan(ctx: BuildContext, calib: Calibration, allocation: Allocation, acts: dict[str, int | None]) -> BitPlan:
    """The resolved plan of a weight ``allocation`` and activation widths ``acts`` (protected layers at 16 bits)."""
    from ..bos import attach_bos

    layers = {n: {"weights": BITS_TO_DTYPE[int(allocation.choice.get(n, 16))],
                  **_act_entry(ctx.settings, calib, n, acts[n])} for n in ctx.table}
    plan = BitPlan(layers=layers)
    if calib.bos_state is not None:
        plan = attach_bos(plan, calib.bos_state)
    return plan.resolve(ctx.denoiser)


def _solver_record(a: Allocation, *keys: str) -> dict:
    return {key: getattr(a, key) for key in keys}


def _damage(score: float, metric: str) -> float:
    """How much a score says the layer hurts: noise power relative to the signal for SQNR (dB), 1 - SSIM."""
    return 10 ** (-score / 10) if metric == "sqnr_db" else max(1.0 - score, 0.0)


def most_sensitive(scores: dict[str, float], groups: dict[str, str], metric: dict[str, str], count: int) -> list[str]:
    """The ``count`` layers whose score hurts most. Groups are scored on different scales, so each layer's damage
    (:func:`_damage`) is taken relative to the mean damage of its group before ranking across groups."""
    damage = {n: _damage(v, metric[groups[n]]) for n, v in scores.items()}
    mean = {g: sum(d for n, d in damage.items() if groups[n] == g) / max(1, sum(groups[n] == g for n in damage))
            for g in set(groups[n] for n in damage)}
    relative = {n: d / mean[groups[n]] if mean[groups[n]] > 0 else 0.0 for n, d in damage.items()}
    return sorted(relative, key=lambda n: (-relative[n], n))[:count]


def weight_candidates(ctx: BuildContext, sens: Sensitivities) -> list[Allocation]:
    """Per-group weight allocations over the split ratios (solver statistics into the report)."""
    s, table, groups = ctx.settings, ctx.table, ctx.groups
    scores = sens.weights.scores
    problem = AllocationProblem(
        layers=[LayerChoice(n, table[n].numel, groups[n], scores[n] or {w: 0.0 for w in s.widths[groups[n]]})
                for n in ctx.candidates],
        budget_bits=s.weight_bits,
        tolerance=s.tolerance,
        mode=s.budget_mode,
        fixed=[FixedLayer(n, table[n].numel, 16, groups[n]) for n in ctx.protected],
    )
    allocations = sweep(problem, ks=s.split_ratios, allocator=s.allocator)
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


def assign(ctx: BuildContext, calib: Calibration, sens: Sensitivities) -> Assignment:
    """Allocate weights and activations, then keep the weight candidate with the lowest image MSE (see the module
    docstring). Records times, costs and solver statistics in ``ctx.report``."""
    t0 = time.perf_counter()
    rec, report = calib.recording, ctx.report
    allocations = weight_candidates(ctx, sens)
    acts = activation_widths(ctx, calib, sens)
    plans = {id(a): to_plan(ctx, calib, a, acts) for a in allocations}
    mse_of: dict[int, float] = {}

    def image_mse(allocation: Allocation) -> float:
        with applied(ctx.denoiser, plans[id(allocation)], calib.bos_state), torch.no_grad():
            images = run_pipeline(ctx.pipe, ctx.settings)
        mse_of[id(allocation)] = float((images - rec.images).pow(2).mean())
        return mse_of[id(allocation)]

    best = pick(allocations, image_mse)
    report.candidate_mse = [mse_of[id(a)] for a in allocations]
    report.chosen_k = best.k
    report.seconds["allocate"] = time.perf_counter() - t0
    report.count("pick", rec.num_calls * len(allocations), rec.num_samples * len(allocations))
    return Assignment(best, plans[id(best)], allocations, report.candidate_mse, acts)
