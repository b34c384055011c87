"""The refine stage (after the allocate stage's pick, on by default in mixed denoiser builds): improve the picked
weight widths by the measured image error of the whole plan on the pick (validation) prompts, within the same
budget.

Why: the allocator adds up per-layer scores measured with one layer quantized and the rest in full precision, and
splits the budget between score scales by ``k``; how layers' errors combine in the quantized model is not modelled
(on `scenes` the picked W4A8 plan's int2 layers cost 0.5e-4 image MSE quantized together in full precision, while
the whole plan is 3.4e-4 worse than uniform int4: BENCHMARKS.md "Refinement (issue 14)").

Each **round** measures every candidate layer *inside the current plan* (the rest of the model quantized as
planned) at its widest candidate and one step down: the noise power of the denoiser output on the recorded calls
(``10^(-SQNR/10)``, one scale for every layer, replayed on ``sweep_fraction`` of the samples); the other widths
follow 4x per bit (:mod:`.noise_model`). From that table come proposals: first the joint ILP over every layer in
that one unit (no ``k``), then budget-keeping swaps, best predicted first (:mod:`.allocate.moves`). Each proposal
is applied and its images of the pick prompts compared with full precision (:func:`~.plan_errors.image_errors`);
it is kept only when the refine objective (``psnr``, ``tail`` or ``mse``, default the pick's) improves by more than
``refine_significance`` paired standard errors (:func:`~.allocate.moves.paired_gain`: a few prompts' mean moves by
chance as much as a plan change moves it) and, with ``refine_guard`` (the default), it adds no diverged image and
does not worsen the tail by more than as many standard errors (:mod:`.refine_guard`). After a kept proposal the
next round re-measures, while ``refine_rounds`` remain; it stops after ``refine_evaluations`` plan evaluations or
when no proposal is left. The result is never worse than the start on its objective and never over the
budget. Plan evaluations and in-plan scores are cached in ``cache_dir`` (``refine-<key>-images.json``,
``refine-<key>-context-<plan>.json``; in a sharded build each process writes its own ``.part<i>`` of them), so an
interrupted build resumes to the same plan; the provenance records every proposal tried, why it was kept or not,
and what was kept.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from .allocate import AllocationProblem, FixedLayer, LayerChoice, objective, solve
from .allocate.moves import Move, paired_gain, size_bits, swap_moves
from .allocate.result import average
from .assign import Assignment, to_plan
from .context import BuildContext
from .measure import sweep_key
from .noise_model import layer_deltas, noise, probe_widths
from .options import DEFAULT_REFINE_EVALUATIONS
from .plan_errors import image_errors
from .progress import sweep_bar
from .refine_guard import diverged, guard
from .recording import Calibration
from .scores import merged
from .sensitivity import applied, layer_sensitivity, replay_sqnr


#: the one line a build with text-encoder components records (and prints) when the default refine is skipped
SKIPPED_WITH_COMPONENTS = ("refine stage skipped: it refines the denoiser's widths alone and this build has "
                           "text-encoder components")


def resolved(s, components: bool = False):
    """``s`` with the refine stage's evaluations filled in where not given (``None``): the default,
    :data:`~.options.DEFAULT_REFINE_EVALUATIONS`, or 0 in a build with text-encoder ``components``."""
    if s.refine_evaluations is not None:
        return s
    return replace(s, refine_evaluations=0 if components else DEFAULT_REFINE_EVALUATIONS)


def enabled(ctx: BuildContext) -> bool:
    """Whether the build refines: evaluations to spend and a candidate layer with more than one width to take
    (a build with nothing to choose pays nothing)."""
    s = ctx.settings
    return bool(s.refine_evaluations) and any(len(set(s.widths[ctx.groups[n]])) > 1 for n in ctx.candidates)


class Refinement:
    """One refinement: the plans tried (cached by their widths), the costs, the record for the provenance."""

    def __init__(self, ctx: BuildContext, calib: Calibration, chosen: Assignment):
        s = ctx.settings
        self.ctx, self.calib, self.chosen, self.s = ctx, calib, chosen, s
        self.kind = s.refine_objective or s.pick_objective
        self.sizes = {n: float(ctx.table[n].numel) for n in ctx.table}
        slack = s.tolerance if s.budget_mode == "band" else 0.0
        self.limit = (s.weight_bits + slack) * sum(self.sizes.values()) + 1e-6
        self.sub = calib.recording.subset(s.sweep_fraction)
        key = hashlib.sha256(json.dumps([sweep_key(ctx.denoiser, s), list(s.pick_settings.prompts), s.activations,
                                         list(s.act_widths)]).encode()).hexdigest()[:16]
        self.base = Path(s.cache_dir) / f"refine-{key}" if s.cache_dir else None
        self.errors = ctx.score_cache(None if self.base is None else
                                      self.base.parent / f"{self.base.name}-images.json")
        self.spent = {"evaluations": 0, "reused_evaluations": 0, "context_calls": 0, "context_samples": 0,
                      "context_reused": 0}

    def plan(self, choice: dict):
        allocation = replace(self.chosen.best, choice=dict(choice))
        return to_plan(self.ctx, self.calib, allocation, self.chosen.activations)

    def image_errors(self, choice: dict) -> list[float]:
        """``choice``'s per-image MSE on the pick prompts (cached by its widths)."""
        key = _choice_key(choice)
        cached = [self.errors.get(f"{key}|{i}") for i in range(len(self.s.pick_settings.prompts))]
        if all(v is not None for v in cached):
            self.spent["reused_evaluations"] += 1
            return cached
        errors = image_errors(self.ctx, self.calib, self.plan(choice), self.chosen.reference)
        self.spent["evaluations"] += 1
        for i, e in enumerate(errors):
            self.errors.scores[f"{key}|{i}"] = e
        self.errors.put(f"{key}|n", float(len(errors)))  # one write per plan
        return errors

    def deltas(self, choice: dict) -> dict[str, dict[int, float]]:
        """Each candidate layer's change of the plan's error at each candidate width, in the current plan: measured
        at its widest candidate and one step down (:func:`~.noise_model.probe_widths`), the other widths from the
        layer's own share of the error, 4x per bit (:func:`~.noise_model.layer_deltas`)."""
        ctx, s = self.ctx, self.s
        current = {n: int(choice[n]) for n in ctx.candidates}
        widths = {n: probe_widths(s.widths[ctx.groups[n]], current[n]) for n in ctx.candidates}
        cache = ctx.score_cache(None if self.base is None else
                                self.base.parent / f"{self.base.name}-context-{_choice_key(choice)}.json")
        plan = self.plan(choice)
        specs, originals = plan.layer_specs(), {n: ctx.denoiser.get_submodule(n) for n in ctx.candidates}
        by_probes: dict[tuple, list[str]] = {}
        for n in ctx.candidates:
            by_probes.setdefault(tuple(widths[n]), []).append(n)
        scores: dict[str, dict[int, float]] = {}
        with applied(ctx.denoiser, plan, self.calib.bos_state):
            base = cache.get("<plan>|0")
            if base is None:
                base = replay_sqnr(ctx.denoiser, self.sub)
                cache.put("<plan>|0", base)
                self._spend(self.sub.num_calls, self.sub.num_samples)
            for probes, names in by_probes.items():  # layers measured at the same widths: one sweep
                result = layer_sensitivity(
                    ctx.denoiser, names, {"content": list(probes)}, {n: "content" for n in names},
                    lambda n, b: replace(specs[n], weights=f"int{b}"), self.sub, None, (0, 0),
                    bos_state=self.calib.bos_state, progress=ctx.progress, cache=cache, shard=ctx.shard,
                    module_of=originals.__getitem__)
                if ctx.state is not None:  # the processes split the layers; every process takes every score
                    result.fill_from(merged(cache))
                scores.update(result.scores)
                self._spend(result.cost.calls, result.cost.samples, result.reused.samples)
        return {n: layer_deltas(s.widths[ctx.groups[n]], current[n], noise(base),
                                {b: noise(scores[n][b]) for b in widths[n]}) for n in ctx.candidates}

    def _spend(self, calls: int, samples: int, reused: int = 0) -> None:
        self.spent["context_calls"] += calls
        self.spent["context_samples"] += samples
        self.spent["context_reused"] += reused

    def proposals(self, choice: dict, deltas: dict) -> list[Move]:
        """The joint ILP over the in-plan table, then the budget-keeping swaps (best predicted first)."""
        ctx, s = self.ctx, self.s
        scale = max((abs(v) for d in deltas.values() for v in d.values()), default=0.0) or 1.0
        problem = AllocationProblem(
            layers=[LayerChoice(n, self.sizes[n], "all", {w: -v / scale for w, v in deltas[n].items()})
                    for n in ctx.candidates],
            budget_bits=s.weight_bits, tolerance=s.tolerance, mode=s.budget_mode,
            fixed=[FixedLayer(n, self.sizes[n], 16) for n in ctx.protected])
        solved = solve(problem, allocator=s.allocator).choice
        changes = {n: int(solved[n]) for n in ctx.candidates if int(solved[n]) != choice[n]}
        joint = [Move(changes, sum(deltas[n][w] for n, w in changes.items()), "ilp")] if changes else []
        return joint + swap_moves(choice, deltas, self.sizes, self.limit)


def _choice_key(choice: dict) -> str:
    return hashlib.sha256(json.dumps(sorted((n, int(w)) for n, w in choice.items())).encode()).hexdigest()[:16]


def refine(ctx: BuildContext, calib: Calibration, chosen: Assignment) -> Assignment:
    """``chosen`` refined (see the module docstring); its record in ``chosen.refine``, its costs in the report."""
    run, s = Refinement(ctx, calib, chosen), ctx.settings
    current = {n: int(chosen.best.choice.get(n, 16)) for n in ctx.table}
    start = best = chosen.best_errors or run.image_errors(current)
    rounds, queue, seen, kept, tried = 0, [], {tuple(sorted(current.items()))}, [], []
    with sweep_bar("refine (plans evaluated)", s.refine_evaluations, 0, ctx.progress) as bar:
        while run.spent["evaluations"] + run.spent["reused_evaluations"] < s.refine_evaluations:
            if not queue:
                if rounds >= s.refine_rounds or (rounds and not any(k["round"] == rounds for k in kept)):
                    break  # re-measuring an unchanged plan would propose the same moves
                queue, rounds = run.proposals(current, run.deltas(current)), rounds + 1
                continue
            move = queue.pop(0)
            changes = {n: w for n, w in move.changes.items() if current[n] != w}  # a stale move: only what changes
            new = {**current, **changes}
            key = tuple(sorted(new.items()))
            if not changes or key in seen or size_bits(new, run.sizes) > run.limit:
                continue
            seen.add(key)
            errors = run.image_errors(new)
            bar.update(1)
            gain, reason = _verdict(errors, best, run.kind, s)
            accepted = reason == "kept"
            tried.append([move.kind, len(changes), objective(errors, run.kind), round(gain, 3), accepted, reason])
            if accepted:
                kept.append({"kind": move.kind, "round": rounds, "objective": objective(errors, run.kind),
                             "gain_se": gain, "changes": {n: [current[n], w] for n, w in changes.items()}})
                best, current = errors, new
                if rounds < s.refine_rounds:
                    queue = []  # re-measure inside the new plan
    return _result(run, chosen, current, (start, best), kept, tried, rounds)


def _verdict(errors: list[float], best: list[float], kind: str, s) -> tuple[float, str]:
    """The paired gain of ``errors`` over ``best`` in standard errors, and ``"kept"`` or why not: the objective not
    better, the gain not significant, or (``refine_guard``) the tail worse (:func:`~.refine_guard.guard`)."""
    gain = paired_gain(errors, best, kind)
    if not objective(errors, kind) < objective(best, kind):
        return gain, "objective not better"
    if not gain > s.refine_significance:
        return gain, f"gain under {s.refine_significance:g} standard errors"
    return gain, (guard(errors, best, s.refine_significance) if s.refine_guard else None) or "kept"


def _result(run: Refinement, chosen: Assignment, choice: dict, ends: tuple[list, list], kept: list, tried: list,
            rounds: int) -> Assignment:
    ctx, report = run.ctx, run.ctx.report
    calls, samples = _eval_cost(run)
    report.count("refine", calls * run.spent["evaluations"], samples * run.spent["evaluations"],
                 reused=(calls * run.spent["reused_evaluations"], samples * run.spent["reused_evaluations"]))
    report.count("refine_context", run.spent["context_calls"], run.spent["context_samples"],
                 reused=(0, run.spent["context_reused"]))
    total_bits, avg = average(choice, run.sizes, run.sizes)
    best_alloc = replace(chosen.best, choice={**chosen.best.choice, **choice}, avg_bits=avg, total_bits=total_bits)
    record = {"objective": run.kind, "significance": run.s.refine_significance, "guard": run.s.refine_guard,
              "start": objective(ends[0], run.kind), "final": objective(ends[1], run.kind),
              "diverged": [diverged(e) for e in ends], "rounds": rounds, "kept": kept, "tried": tried,
              "spent": {"max_evaluations": run.s.refine_evaluations, "max_rounds": run.s.refine_rounds, **run.spent}}
    return replace(chosen, best=best_alloc, plan=run.plan(choice), refine=record)


def _eval_cost(run: Refinement) -> tuple[int, int]:
    from .assign import pick_cost

    return pick_cost(run.calib, run.s)
