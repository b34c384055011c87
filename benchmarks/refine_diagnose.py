"""Why the W4A8 mixed plan barely beats uniform int4 on `scenes` (issue #14, refine): how well the allocator's model
(a sum of per-layer sensitivities, each measured with one layer quantized) predicts the measured image error of
whole plans on the validation prompts.

    OMP_NUM_THREADS=1 python benchmarks/refine_diagnose.py --model scenes --out benchmarks/results/refine_diagnose_scenes.json

Builds as examples/build_scenes_plans.py's w4a8-mixed does (16 calibration prompts, 48 validation pick prompts, at
most 4.0 bits), with ``activations: dynamic-token`` and ``pick_objective: psnr``; then, on the 48 validation
prompts: every swept candidate and ``--random`` random plans of the same size (random budget-keeping swaps from the
picked plan), measured mean per-image PSNR against what the sensitivity table predicts for each (per group: the
summed damage, noise power up to a constant: 1 - SSIM for content layers, 10^(-SQNR/10) for quality layers), with
Spearman's rank correlation; the uniform int4 plan; and the picked plan's int2 layers quantized together (rest in
full precision) against the sum of their image MSE each alone. No test prompt is used.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from diffusers_mixdq import demo
from diffusers_mixdq.builder import BuildSettings
from diffusers_mixdq.builder.assign import activation_widths, pick_reference, to_plan, weight_candidates
from diffusers_mixdq.builder.builder import BuildContext, allocator_budget, calibrate, measure
from diffusers_mixdq.builder.distributed import prepare
from diffusers_mixdq.builder.progress import quiet_pipeline
from diffusers_mixdq.builder.plan_errors import image_errors
from diffusers_mixdq.builder.uniform_context import base_width
from diffusers_mixdq.builder.width_ladder import damage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from build_w3a4_plans import setup  # noqa: E402


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = v.argsort()
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties share their mean rank
            r[v == value] = r[v == value].mean()
        return r
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def predicted(choice: dict, sens, groups: dict) -> dict[str, float]:
    """Summed damage per group of a weight choice (the table's additive model)."""
    out: dict[str, float] = {}
    for name, scores in sens.weights.scores.items():
        g = groups[name]
        if int(choice[name]) not in scores:  # kept in full precision
            continue
        out[g] = out.get(g, 0.0) + damage(scores[int(choice[name])], sens.weights.metric[g])
    return out


def random_swap(choice: dict, ctx, rng: random.Random, budget_bits: float) -> dict:
    """``choice`` with one random layer raised and random others lowered until the size is within budget."""
    s, table = ctx.settings, ctx.table
    new = dict(choice)
    total = sum(table[n].numel for n in ctx.table)
    bits = lambda c: sum(table[n].numel * (c.get(n, 16)) for n in ctx.table)  # noqa: E731
    up = [n for n in ctx.candidates if any(w > new[n] for w in s.widths[ctx.groups[n]])]
    u = rng.choice(up)
    new[u] = rng.choice([w for w in s.widths[ctx.groups[u]] if w > new[u]])
    while bits(new) > budget_bits * total:
        down = [n for n in ctx.candidates if n != u and any(w < new[n] for w in s.widths[ctx.groups[n]])]
        v = rng.choice(down)
        new[v] = max(w for w in s.widths[ctx.groups[v]] if w < new[v])
    return new


def headroom(ctx, calib, chosen, choice: dict, widths: dict) -> dict:
    """What mixing can buy at all by the in-plan model: the output noise power of ``choice`` and, per candidate
    width set, the noise the joint ILP over the in-plan deltas predicts (first order), in dB against ``choice``."""
    from diffusers_mixdq.builder.refine import Refinement

    out = {}
    for label, ws in widths.items():
        ctx.settings = replace(ctx.settings, widths=ws)
        run = Refinement(ctx, calib, chosen)
        deltas = run.deltas(choice)
        moves = run.proposals(choice, deltas)
        ilp = next((m for m in moves if m.kind == "ilp"), None)
        base = 10 ** (-run_base_db(run, choice) / 10)
        gain = ilp.predicted if ilp is not None else 0.0
        out[label] = {"base_noise": base, "ilp_predicted_noise": base + gain,
                      "predicted_gain_db": float(10 * np.log10(base / max(base + gain, 1e-30))),
                      # the layers' one-at-a-time gains at int8, summed, over the plan's noise (1: additive)
                      "int8_gains_sum_over_noise": float(sum(-d[8] for d in deltas.values() if 8 in d) / base),
                      "ilp_changes": len(ilp.changes) if ilp is not None else 0}
        print(label, json.dumps(out[label]))
    return out


def run_base_db(run, choice: dict) -> float:
    from diffusers_mixdq.builder.sensitivity import applied, replay_sqnr

    with applied(run.ctx.denoiser, run.plan(choice), run.calib.bos_state):
        return replay_sqnr(run.ctx.denoiser, run.sub)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="scenes")
    parser.add_argument("--random", type=int, default=6)
    parser.add_argument("--cache-dir", default="_work/refine/cache_scenes")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    pipe, common, keep, _ = setup(args.model)
    settings = BuildSettings(**common, weight_bits=4.0, activations="dynamic-token", pick_objective="psnr",
                             pick_prompts=demo.prompt_set(args.model, "validation", 48),
                             protect_first_last=bool(keep), cache_dir=args.cache_dir)
    _, denoiser = prepare(pipe, settings)
    with quiet_pipeline(pipe):
        ctx = BuildContext(pipe, denoiser, allocator_budget(settings, denoiser).for_model(denoiser), None, True)
        calib = calibrate(pipe, ctx.settings, progress=True)
        sens = measure(ctx, calib)
        acts = activation_widths(ctx, calib, sens)
        reference = pick_reference(ctx, calib)
        psnr = lambda errors: float(np.mean([-10 * np.log10(max(e, 1e-12)) for e in errors]))  # noqa: E731
        rows = []

        def evaluate(label: str, choice: dict) -> dict:
            plan = to_plan(ctx, calib, replace(candidates[0], choice=choice), acts)
            errors = image_errors(ctx, calib, plan, reference)
            row = {"label": label, "val_mean_psnr": psnr(errors), "val_mean_mse": float(np.mean(errors)),
                   "avg_bits": plan.summary().avg_weight_bits, "predicted_damage": predicted(choice, sens, ctx.groups),
                   "int2": sum(1 for n in ctx.candidates if choice[n] == 2),
                   "int8": sum(1 for n in ctx.candidates if choice[n] == 8)}
            rows.append(row)
            print(json.dumps(row))
            return row

        candidates = weight_candidates(ctx, sens)
        for a in candidates:
            evaluate(f"k={a.k}", a.choice)
        best = max(rows, key=lambda r: r["val_mean_psnr"])  # the candidate the psnr pick keeps
        start = next(a.choice for a in candidates if f"k={a.k}" == best["label"])
        base = base_width(ctx.settings.widths, ctx.settings.weight_bits)
        evaluate("uniform", {**start, **{n: base for n in ctx.candidates}})
        rng = random.Random(0)
        for i in range(args.random):
            evaluate(f"random{i}", random_swap(start, ctx, rng, ctx.settings.weight_bits))
        # the picked plan's int2 layers, together and each alone (rest full precision, activations as planned)
        int2 = [n for n in ctx.candidates if start[n] == 2]
        fp = {n: 16 for n in ctx.table}
        together = evaluate("int2-together", {**fp, **{n: 2 for n in int2}})
        alone = [evaluate(f"int2-alone:{n}", {**fp, n: 2}) for n in int2]
        acts_only = evaluate("activations-only", fp)
        from diffusers_mixdq.builder.assign import Assignment

        chosen = Assignment(replace(candidates[0], choice=start), None, candidates, [], acts, reference=reference)
        uniform_choice = {**start, **{n: base for n in ctx.candidates}}
        room = headroom(ctx, calib, chosen, uniform_choice, {
            "{2,4,8}/{4,8}": {"content": [2, 4, 8], "quality": [4, 8]},
            "{2,4,8} both": {"content": [2, 4, 8], "quality": [2, 4, 8]},
            "{2,3,4,5,6,8}/{3,4,5,6,8}": {"content": [2, 3, 4, 5, 6, 8], "quality": [3, 4, 5, 6, 8]}})
    swept = [r for r in rows if r["label"].startswith(("k=", "random", "uniform"))]
    corr = {}
    for g in ("content", "quality"):
        corr[g] = spearman([r["predicted_damage"].get(g, 0.0) for r in swept], [-r["val_mean_psnr"] for r in swept])
    result = {"rows": rows, "spearman_damage_vs_error": corr, "headroom_at_uniform": room, "int2_layers": int2,
              "int2_together_mse": together["val_mean_mse"], "activations_only_mse": acts_only["val_mean_mse"],
              "int2_alone_mse_sum": float(sum(r["val_mean_mse"] - acts_only["val_mean_mse"] for r in alone))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
