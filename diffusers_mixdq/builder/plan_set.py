"""Plan sets: one build gives plans for the denoiser and the text encoders of a pipeline (issue #16), the layout
``MixDQConfig`` and ``PipelineQuantizationConfig(quant_backend="mixdq")`` read (a folder per component).

The denoiser goes through the usual stages (:mod:`.builder`); after its sensitivities, the text encoders named in
``components`` are measured (:mod:`.text_encoders`: scored like content layers; widths kept BOS-safe by
:mod:`.bos_floors`) and allocated as ``budget_scope`` says:

* ``"joint"`` (default): one average-bits budget (``weight_bits``, parameter-weighted) over every component's
  layers. The text-encoder layers join the denoiser's content group, so the ``k`` sweep splits the budget between
  the content layers of every component and the denoiser's quality layers, and the pick compares whole pipelines.
  One component may end wider than the budget and another narrower; together they meet it.
* ``"per_component"``: each component its own budget (``component_budgets[c]``, else ``weight_bits``). The
  denoiser is allocated as in a denoiser-only build; each text encoder by one ILP over its layers (one group,
  nothing to split); the pick runs over the denoiser's candidates with the text encoders' plans applied.

The denoiser plan's provenance has everything a denoiser-only build records (its ``allocation.avg_bits`` is the
allocation's: over every component in a joint build); each plan's ``provenance.components`` gives the scope, the
budgets, each component's average bits and the BOS drift of the chosen text encoders.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Sequence

from ..families import denoiser_of
from ..plan import BOS_MATCH_TOLERANCE, BitPlan
from .allocate import AllocationProblem, LayerChoice, solve
from .allocate.result import Allocation
from .bos_floors import bos_drift, bos_safe_widths
from .builder import build_stages
from .progress import quiet_pipeline
from .refine import SKIPPED_WITH_COMPONENTS, resolved
from .settings import BuildReport, BuildSettings
from .text_encoders import (GROUP, TextEncoderPart, applied_plans, measure_text_encoders, text_encoder_parts,
                            text_encoder_plan)
from .write import prompts_record

BUDGET_SCOPES = ("joint", "per_component")


@dataclass
class OtherComponents:
    """What the allocate stage needs of the text encoders: ``layers`` allocated with the denoiser's (joint), the
    text encoders' own allocation (``fixed``, per component) and the naive protocol's cost of measuring them."""

    parts: list[TextEncoderPart]
    layers: list[LayerChoice]
    fixed: dict[str, float]
    naive: int = 0

    def plans(self, allocation: Allocation) -> dict[str, BitPlan]:
        """Each text encoder's plan for a denoiser ``allocation`` (joint: its choice covers their layers too)."""
        choice = {**self.fixed, **allocation.choice}
        return {p.component: text_encoder_plan(p, {n: choice[p.key(n)] for n in p.table}) for p in self.parts}

    def applied(self, plans: dict[str, BitPlan]):
        return applied_plans(self.parts, plans)


def _choices(part: TextEncoderPart) -> list[LayerChoice]:
    return [LayerChoice(part.key(n), part.table[n].numel, GROUP, part.scores[n]) for n in part.table]


def other_components(parts: Sequence[TextEncoderPart], s: BuildSettings, naive: int) -> OtherComponents:
    """The text encoders' layers for a joint allocation, or their own allocations (per component)."""
    if s.budget_scope == "joint":
        return OtherComponents(list(parts), [c for p in parts for c in _choices(p)], {}, naive)
    fixed: dict[str, float] = {}
    for part in parts:
        problem = AllocationProblem(_choices(part), s.component_budgets.get(part.component, s.weight_bits),
                                    tolerance=s.tolerance, mode=s.budget_mode)
        fixed.update(solve(problem, allocator=s.allocator).choice)
    return OtherComponents(list(parts), [], fixed, naive)


def build_plan_set(pipe, settings: BuildSettings, progress: bool = True) -> tuple[dict[str, BitPlan], BuildReport]:
    """Plans ``{component: plan}`` for the denoiser and the text encoders among ``settings.components`` (none
    listed: the denoiser's alone, as :func:`~.builder.build_plan`), and the build's report."""
    with quiet_pipeline(pipe):
        settings.validate()
        component, _ = denoiser_of(pipe, settings.component)
        parts = text_encoder_parts(pipe, list(settings.components) or [component], component)
        if not parts:
            plan, report, _ = build_stages(pipe, settings, progress)
            return {component: plan}, report
        s = resolved(settings, components=True)
        if progress and settings.refine_evaluations is None:
            print(SKIPPED_WITH_COMPONENTS, file=sys.stderr)
        if s.budget_scope == "per_component":
            s = replace(s, weight_bits=s.component_budgets.get(component, s.weight_bits))
        seen: dict[str, Any] = {}

        def others_for(ctx, calib) -> OtherComponents:
            t0 = time.perf_counter()
            seen["raised"] = bos_safe_widths(pipe, parts, s.text_encoder_widths, calib.bos_state)
            seen["bos_state"] = calib.bos_state
            naive = measure_text_encoders(ctx, calib, parts)
            ctx.report.seconds["text_encoders"] = time.perf_counter() - t0
            return other_components(parts, settings, naive)

        plan, report, chosen = build_stages(pipe, s, progress, others_for)
        plans = {component: plan, **chosen.components}
        _record(pipe, plans, parts, settings, component, seen)
        if settings.refine_evaluations is None:  # the default refine, skipped: in the provenance too
            plans[component].provenance["refine"] = {"skipped": SKIPPED_WITH_COMPONENTS}
        return plans, report


def _record(pipe, plans: dict[str, BitPlan], parts: Sequence[TextEncoderPart], s: BuildSettings, denoiser: str,
            seen: dict[str, Any]) -> None:
    """``provenance.components`` of every plan (and the text encoders' build provenance)."""
    te_plans = {p.component: plans[p.component] for p in parts}
    drift = bos_drift(pipe, parts, te_plans, seen["bos_state"]) if seen["bos_state"] is not None else None
    if drift is not None and drift > BOS_MATCH_TOLERANCE:
        warnings.warn(f"The quantized text encoders move the BOS state by {drift:.1%} (tolerance "
                      f"{BOS_MATCH_TOLERANCE:.0%}): the denoiser's BOS rows will take the quantized path.",
                      stacklevel=3)
    summaries = {c: plan.summary() for c, plan in plans.items()}
    params = sum(x.params for x in summaries.values())
    budgets = ({c: s.component_budgets.get(c, s.weight_bits) for c in plans} if s.budget_scope == "per_component"
               else {"joint": s.weight_bits})
    record = {
        "budget_scope": s.budget_scope, "budget_bits": budgets, "denoiser": denoiser,
        "avg_weight_bits": {c: x.avg_weight_bits for c, x in summaries.items()},
        "joint_avg_weight_bits": sum(x.avg_weight_bits * x.params for x in summaries.values()) / max(params, 1),
        "bos_drift": drift, "bos_tolerance": BOS_MATCH_TOLERANCE, "bos_raised_layers": seen["raised"],
    }
    plans[denoiser].provenance["components"] = record
    metric = plans[denoiser].provenance.get("sensitivity_metric", {}).get("weights", {}).get("content")
    for part in parts:
        plans[part.component].provenance = {
            "tool": "diffusers-mixdq build", **prompts_record(s), "steps": s.steps, "guidance": s.guidance,
            "sensitivity_metric": {"weights": {GROUP: metric}}, "text_encoder_widths": list(s.text_encoder_widths),
            "components": record,
        }
