"""The refine stage (after the allocate stage's pick, off by default): improve the picked weight widths by the
measured image error of the whole plan on the pick (validation) prompts, within the same budget.

Why: the allocator adds up per-layer scores measured with one layer quantized and the rest in full precision, and
splits the budget between score scales by ``k``; how layers' errors combine in the quantized model is not modelled
(on `scenes` the picked W4A8 plan's int2 layers cost ~0.5e-4 image MSE quantized together in full precision,
while the whole plan is 3.4e-4 worse than uniform int4: BENCHMARKS.md "Refinement (issue 14)").

Each **round** measures every candidate layer at each of its other candidate widths *inside the current plan*
(the rest of the model quantized as planned): the noise power of the denoiser output on the recorded calls
(``10^(-SQNR/10)``, one scale for every layer, replayed on ``sweep_fraction`` of the samples), as a change
against the current plan's. From that table come proposals (:mod:`.allocate.moves`): first the joint ILP over
every layer in that one unit (no ``k``), then budget-keeping swaps, best predicted first. Each proposal is
applied and its images of the pick prompts compared with full precision (:func:`~.plan_errors.image_errors`);
it is kept only when the refine objective (``psnr``, ``tail`` or ``mse``, default the pick's) improves. After a
kept proposal the next round re-measures, while ``refine_rounds`` remain; it stops after
``refine_evaluations`` plan evaluations or when no proposal is left. The result is never worse than the start on
its objective and never over the budget. Plan evaluations and in-plan scores are cached in ``cache_dir``
(``refine-<key>*.json``), so an interrupted build resumes; provenance records what was tried and kept.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

from .allocate import AllocationProblem, FixedLayer, LayerChoice, objective, solve
from .allocate.moves import Move, size_bits, swap_moves
from .allocate.result import average
from .assign import Assignment, to_plan
from .context import BuildContext
from .measure import sweep_key
from .plan_errors import image_errors
from .progress import sweep_bar
from .recording import Calibration
from .scores import ScoreCache
from .sensitivity import applied, layer_sensitivity, replay_sqnr


def enabled(s) -> bool:
    return s.refine_evaluations > 0


class _Run:
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
        self.errors = ScoreCache(None if self.base is None else self.base.with_suffix(".json"))
        self.spent = {"evaluations": 0, "reused_evaluations": 0, "context_calls": 0, "context_samples": 0,
                      "context_reused": 0}

    def plan(self, choice: dict):
        allocation = replace(self.chosen.best, choice=dict(choice))
        return to_plan(self.ctx, self.calib, allocation, self.chosen.activations)

    def value(self, choice: dict) -> float:
        """The refine objective of ``choice`` on the pick prompts (its per-image errors cached by its widths)."""
        key = _choice_key(choice)
        cached = [self.errors.get(f"{key}|{i}") for i in range(len(self.s.pick_settings.prompts))]
        if all(v is not None for v in cached):
            self.spent["reused_evaluations"] += 1
            return objective(cached, self.kind)
        errors = image_errors(self.ctx, self.calib, self.plan(choice), self.chosen.reference)
        self.spent["evaluations"] += 1
        for i, e in enumerate(errors):
            self.errors.scores[f"{key}|{i}"] = e
        self.errors.put(f"{key}|n", float(len(errors)))  # one write per plan
        return objective(errors, self.kind)

    def deltas(self, choice: dict) -> dict[str, dict[int, float]]:
        """Each candidate layer's change of the output noise power at each candidate width, in the current plan."""
        ctx, s = self.ctx, self.s
        current = {n: int(choice[n]) for n in ctx.candidates}
        widths = {n: [w for w in s.widths[ctx.groups[n]] if w != current[n]] for n in ctx.candidates}
        cache = ScoreCache(None if self.base is None else
                           self.base.parent / f"{self.base.name}-context-{_choice_key(choice)}.json")
        plan = self.plan(choice)
        specs, originals = plan.layer_specs(), {n: ctx.denoiser.get_submodule(n) for n in ctx.candidates}
        with applied(ctx.denoiser, plan, self.calib.bos_state):
            base = cache.get("<plan>|0")
            if base is None:
                base = replay_sqnr(ctx.denoiser, self.sub)
                cache.put("<plan>|0", base)
                self.spent["context_calls"] += self.sub.num_calls
                self.spent["context_samples"] += self.sub.num_samples
            result = layer_sensitivity(
                ctx.denoiser, ctx.candidates, widths, {n: n for n in ctx.candidates},
                lambda n, b: replace(specs[n], weights=f"int{b}"), self.sub, None, (0, 0),
                bos_state=self.calib.bos_state, progress=ctx.progress, cache=cache, module_of=originals.__getitem__)
        self.spent["context_calls"] += result.cost.calls
        self.spent["context_samples"] += result.cost.samples
        self.spent["context_reused"] += result.reused.samples
        noise = lambda db: 0.0 if math.isinf(db) else 10 ** (-db / 10)  # noqa: E731
        return {n: {current[n]: 0.0, **{b: noise(result.scores[n][b]) - noise(base) for b in widths[n]}}
                for n in ctx.candidates}

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
    run, s = _Run(ctx, calib, chosen), ctx.settings
    current = {n: int(chosen.best.choice.get(n, 16)) for n in ctx.table}
    start = best = run.value(current) if run.kind != s.pick_objective or not chosen.best_errors \
        else objective(chosen.best_errors, run.kind)
    rounds, queue, tried, kept = 0, [], {tuple(sorted(current.items()))}, []
    with sweep_bar("refine (plans evaluated)", s.refine_evaluations, 0, ctx.progress) as bar:
        while run.spent["evaluations"] + run.spent["reused_evaluations"] < s.refine_evaluations:
            if not queue:
                if rounds >= s.refine_rounds or (rounds and not kept_since(kept, rounds)):
                    break
                queue, rounds = run.proposals(current, run.deltas(current)), rounds + 1
                continue
            move = queue.pop(0)
            changes = {n: w for n, w in move.changes.items() if current[n] != w}  # a stale move: only what changes
            new = {**current, **changes}
            key = tuple(sorted(new.items()))
            if not changes or key in tried or size_bits(new, run.sizes) > run.limit:
                continue
            tried.add(key)
            value = run.value(new)
            bar.update(1)
            if value < best:
                kept.append({"kind": move.kind, "round": rounds, "objective": value,
                             "changes": {n: [current[n], w] for n, w in changes.items()}})
                best, current = value, new
                if rounds < s.refine_rounds:
                    queue = []  # re-measure inside the new plan
    return _result(run, chosen, current, start, best, kept, rounds, len(tried) - 1)


def kept_since(kept: list, rounds: int) -> bool:
    """Whether a proposal of the last measured round was kept (else re-measuring the same plan is pointless)."""
    return any(k["round"] == rounds for k in kept)


def _result(run: _Run, chosen: Assignment, choice: dict, start: float, best: float, kept: list, rounds: int,
            tried: int) -> Assignment:
    ctx, report = run.ctx, run.ctx.report
    calls, samples = _eval_cost(run)
    report.count("refine", calls * run.spent["evaluations"], samples * run.spent["evaluations"],
                 reused=(calls * run.spent["reused_evaluations"], samples * run.spent["reused_evaluations"]))
    report.count("refine_context", run.spent["context_calls"], run.spent["context_samples"],
                 reused=(0, run.spent["context_reused"]))
    total_bits, avg = average(choice, run.sizes, run.sizes)
    best_alloc = replace(chosen.best, choice={**chosen.best.choice, **choice}, avg_bits=avg, total_bits=total_bits)
    record = {"objective": run.kind, "start": start, "final": best, "rounds": rounds, "plans_evaluated": tried,
              "kept": kept, "spent": {"max_evaluations": run.s.refine_evaluations,
                                           "max_rounds": run.s.refine_rounds, **run.spent}}
    return replace(chosen, best=best_alloc, plan=run.plan(choice), refine=record)


def _eval_cost(run: _Run) -> tuple[int, int]:
    from .assign import pick_cost

    return pick_cost(run.calib, run.s)
