"""The write stage: the chosen plan (resolved by the allocate stage, ranges and BOS state attached) with its
provenance: how it was built (settings, prompts' hash, metrics, solver statistics, costs)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from typing import Any

from ..plan import BitPlan
from .assign import Assignment
from .context import BuildContext
from .measure import Sensitivities
from .published import file_records
from .settings import BuildSettings

def prompts_record(s: BuildSettings) -> dict[str, Any]:
    """The prompts (and pick prompts, when given) as provenance records them: a hash and a count."""
    record = {"prompts_sha256": _sha256(s.prompts), "num_prompts": len(s.prompts)}
    if s.pick_prompts:
        record.update(pick_prompts_sha256=_sha256(s.pick_prompts), num_pick_prompts=len(s.pick_prompts))
    return record


def _sha256(prompts) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def write(ctx: BuildContext, sens: Sensitivities, chosen: Assignment) -> BitPlan:
    """The chosen plan with its provenance."""
    s, report, best = ctx.settings, ctx.report, chosen.best
    metrics = {"weights": sens.weights.metric}
    if sens.activations is not None:
        metrics["activations"] = sens.activations.metric
    kept = [n for n in ctx.candidates if chosen.activations[n] is None] if s.activations != "none" else []
    plan = chosen.plan
    plan.provenance = {
        "tool": "diffusers-mixdq build",
        "settings": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in asdict(s).items()
                     if k not in ("prompts", "sensitivity_files", "pick_prompts")},  # files: by name and hash below, no paths
        **prompts_record(s),
        "sensitivity_metric": metrics,
        **({"sensitivity_files": file_records(s.sensitivity_files)} if s.sensitivity_files else {}),
        "allocation": {"k": best.k, "avg_bits": best.avg_bits, "status": best.status, "mip_gap": best.mip_gap,
                       "candidates": report.solver, "candidate_mse": report.candidate_mse,
                       "pick_objective": s.pick_objective, "candidate_score": report.candidate_score,
                       "activations": report.activation_solver, "activations_kept_unquantized": kept,
                       # with pick_uniform: whether the same-size uniform plan won the pick (it has no k)
                       "uniform_picked": bool(s.pick_uniform and best.k is None and not best.ratios)},
        **({"refine": chosen.refine} if chosen.refine else {}),
        "denoiser_evaluations": report.denoiser_evaluations,
        "sample_evaluations": {**report.sample_evaluations, "naive_total": report.naive_sample_evaluations},
        # results this run took from its cache, at what they cost when measured (not spent by this run)
        "reused_from_cache": {"denoiser_evaluations": report.reused_denoiser_evaluations,
                              "sample_evaluations": report.reused_sample_evaluations},
        "seconds": report.seconds,
    }
    return plan
