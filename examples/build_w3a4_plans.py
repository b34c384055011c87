"""Build the W3A4 plans of issue #14's "MPQ-DM regime" target (extremely low bits) on a bundled demo model:

    python examples/build_w3a4_plans.py --model shapes --out _work/plans/shapes
    python examples/build_w3a4_plans.py --model scenes --out _work/plans/scenes --only w3a4-rule w3a4-mixed

Every plan quantizes activations to int4 with a run-time range per token (``act_range: "dynamic-token"``; static
int4 ranges are hopeless here: BENCHMARKS.md, "Per-token activations..."), calibrated on the first 16 prompts of
the model's **calibration** set; mixed plans pick ``k`` on 48 prompts of its **validation** set, so no prompt of
the **test** set that ``mixdq eval`` uses is seen. On ``scenes`` the family's first and last layers stay in
floating point in every plan (as in examples/build_scenes_plans.py).

* ``w8a4-token``: int8 weights everywhere (the activation-only reference).
* ``w3a4-rule``: the same-size "uniform W3A4" baseline. No single width of {2, 4, 8} averages 3 bits, so: int4
  weights everywhere except one group of layers at int2, chosen per model to land near 3 bits (``RULES``:
  ``shapes``: the UNet's resnets, 54% of its weights, 2.92 bits; ``scenes``: the feed-forwards ``*.ff.*``, as the
  project's w3a8-rule).
* ``w3a4-mixed``: the builder at exactly the average weight bits of ``w3a4-rule``, widths {2, 4, 8} for both
  the content and the quality group, activation width {4} (``act_widths=[4]``).
* ``-omq5``: + outlier-aware widths (``outlier_fraction=0.05``: int8 rows for the 5% highest-kurtosis output
  channels of every int4 / int2 layer; the budget pays for them); ``-distill``: + ``distill_seconds=120``
  (rank-4 adapters on the content layers ``*attn2.*``, ``*.ff.*`` trained against full precision); ``-bal``: + channel balancing (``balance=True``). Each variant
  adds one stage to the one before it. Outside that chain, ``w3a4-mixed-bal`` and ``w3a4-mixed-distill-bal``: the
  same stages without the outlier rows. These rows pin the defaults of their time (``OLD_DEFAULTS``: refine off,
  the MSE pick), so they rebuild the plans of the first measurement.
* ``w3a4-s7*`` (re-measured in session 7, BENCHMARKS.md): the builder's defaults of today (the refine stage, the
  PSNR pick), the same budget and widths. ``w3a4-s7``: no stage; ``-bal``: + balancing; ``-omq1``: + outlier rows
  at ``outlier_fraction=0.01`` (each row stored once); ``-d10`` / ``-d30``: + a short distillation
  (``SHORT_DISTILL``: 10 / 30 s of rank-2 adapters on the content layers; the 120 s of rank 4 above fitted the 16
  calibration prompts' trajectory, not the test set).

The mixed builds share one ``--cache-dir`` (calibration, sensitivities, refine).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from diffusers_mixdq import BitPlan, demo
from diffusers_mixdq.builder import BuildSettings, build_plan, calibrated_plan
from diffusers_mixdq.families import family_of

ACTS = {"activations": "int4", "act_range": "dynamic-token"}
#: per model: the layers the same-size rule plan puts at int2 (everything else int4)
RULES = {"shapes": ["*resnets*"], "scenes": ["*.ff.*"]}
#: the distill stage: rank-4 adapters on the content layers only (on every layer they would cost 0.78 bits of
#: shapes' 2.92-bit budget, which with the outlier rows' 0.45 leaves less than int2 everywhere)
DISTILL = {"distill_seconds": 120.0, "lowrank_layers": ("*attn2.*", "*.ff.*")}
#: mixed variants, each one more stage on the one before: name -> extra builder settings
MIXED = {
    "w3a4-mixed": {},
    "w3a4-mixed-omq5": {"outlier_fraction": 0.05},
    "w3a4-mixed-omq5-distill": {"outlier_fraction": 0.05, **DISTILL},
    "w3a4-mixed-omq5-distill-bal": {"outlier_fraction": 0.05, **DISTILL, "balance": True},
    # outside the chain: the stages without the outlier rows
    "w3a4-mixed-bal": {"balance": True},
    "w3a4-mixed-distill-bal": {**DISTILL, "balance": True},
}
#: what the ``MIXED`` plans were built with (the builder's defaults before session 6)
OLD_DEFAULTS = {"pick_objective": "mse", "refine_evaluations": 0}
#: a distillation that does not fit the calibration prompts: rank 2 (half the bits), seconds per variant
SHORT_DISTILL = {"distill_rank": 2, "lowrank_layers": ("*attn2.*", "*.ff.*")}
#: today's defaults (refine on, PSNR pick): name -> extra builder settings
TODAY = {
    "w3a4-s7": {},
    "w3a4-s7-bal": {"balance": True},
    "w3a4-s7-omq1-bal": {"outlier_fraction": 0.01, "balance": True},
    "w3a4-s7-omq1-d10-bal": {"outlier_fraction": 0.01, **SHORT_DISTILL, "distill_seconds": 10.0, "balance": True},
    "w3a4-s7-omq1-d30-bal": {"outlier_fraction": 0.01, **SHORT_DISTILL, "distill_seconds": 30.0, "balance": True},
    "w3a4-s7-omq2-d10-bal": {"outlier_fraction": 0.02, **SHORT_DISTILL, "distill_seconds": 10.0, "balance": True},
}
PLANS = ("w8a4-token", "w3a4-rule", *MIXED, *TODAY)


def setup(model_name: str):
    """(pipeline, common builder settings, layers kept in floating point, base_model) of a bundled model."""
    model = demo.get_model(model_name)
    pipe = DiffusionPipeline.from_pretrained(demo.pipeline_path(model_name))
    pipe.set_progress_bar_config(disable=True)
    gen = model.generation_settings()
    common = dict(prompts=demo.prompt_set(model_name, "calibration", 16), steps=gen["steps"],
                  guidance=gen["guidance"], height=gen["height"], width=gen["width"], seed=1000,
                  pipe_kwargs=gen["pipe_kwargs"])
    keep = [] if model_name == "shapes" else list(family_of(pipe.transformer).first_last)
    base = "diffusers_mixdq/demo/pipeline" if model_name == "shapes" else "diffusers_mixdq/demo/scenes/pipeline"
    return pipe, common, keep, base


def uniform(pipe, name: str, model_name: str, common: dict, keep: list[str], base: str) -> BitPlan:
    """The calibrated w8a4-token or w3a4-rule plan (rules resolved to per-layer entries)."""
    weights = "int8" if name == "w8a4-token" else "int4"
    rules = [] if name == "w8a4-token" else [{"targets": RULES[model_name], "weights": "int2", **ACTS}]
    plan = BitPlan(defaults={"weights": weights, **ACTS}, rules=rules, ignore=keep or None,
                   target={"base_model": base})
    plan = calibrated_plan(pipe, plan, BuildSettings(**common), progress=False)
    return plan.resolve(pipe.transformer if hasattr(pipe, "transformer") else pipe.unet) if plan.rules else plan


def model_arguments(doc: str, plans) -> argparse.Namespace:
    """The command line of a script that builds some of ``plans`` on a bundled model (also
    examples/build_ablation_plans.py): ``--model``, ``--out``, ``--only``, ``--cache-dir``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("shapes", "scenes"), default="shapes")
    parser.add_argument("--out", type=Path, required=True, help="directory for the plans (e.g. _work/plans/shapes)")
    parser.add_argument("--only", nargs="+", choices=plans, default=list(plans), metavar="PLAN")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: <out>/cache")
    return parser.parse_args()


def main() -> None:
    args = model_arguments(__doc__, PLANS)

    torch.manual_seed(0)
    pipe, common, keep, base = setup(args.model)
    rule = uniform(pipe, "w3a4-rule", args.model, common, keep, base)
    budget = rule.summary().avg_weight_bits
    for name in (n for n in PLANS if n in args.only):
        t0 = time.perf_counter()
        if name in MIXED or name in TODAY:
            extra = {**OLD_DEFAULTS, **MIXED[name]} if name in MIXED else TODAY[name]
            settings = BuildSettings(**{**common, "weight_bits": budget, "activations": "dynamic-token",
                                        "act_widths": [4], "widths": {"content": [2, 4, 8], "quality": [2, 4, 8]},
                                        "protect_first_last": bool(keep),
                                        "pick_prompts": demo.prompt_set(args.model, "validation", 48),
                                        "cache_dir": str(args.cache_dir or args.out / "cache"), **extra})
            plan, report = build_plan(pipe, settings, progress=False)
            plan.target["base_model"] = base
            print(json.dumps({"chosen_k": report.chosen_k, "seconds": report.seconds,
                              "sample_evaluations": report.sample_evaluations,
                              "distillation": plan.provenance.get("distillation")}))
        else:
            plan = rule if name == "w3a4-rule" else uniform(pipe, name, args.model, common, keep, base)
        plan.save(args.out / name)
        print(f"{name}: {time.perf_counter() - t0:.1f}s, {plan.summary().avg_weight_bits:.3f} weight bits", flush=True)


if __name__ == "__main__":
    main()
