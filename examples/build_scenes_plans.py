"""Build the bundled plans of the `scenes` demo model (diffusers_mixdq/demo/plans/scenes/).

    python examples/build_scenes_plans.py                      # all five
    python examples/build_scenes_plans.py --only w4a8-mixed --out _work/plans

Every plan keeps the family's first and last layers (`pos_embed.proj`, `proj_out`) in floating point, quantizes
every other input to int8 with the builder's default range (``--activations``: ``dynamic-token``, a run-time range
per token, or ``int8``, static ranges as the plans bundled before issue #14), is calibrated on the first 16 prompts
of the model's **calibration** set, and runs the pipeline with the arguments of its `defaults.json` (PixArt at 32 px: no resolution binning,
16-token captions). The text encoder is T5 (not causal), so no layer is BOS-aware.

* `w8a8`, `w4a8-uniform`: int8 / int4 weights everywhere.
* `w3a8-rule`: the same-size baseline of `w3a8-mixed`: int4 weights everywhere except the feed-forward layers
  (`*.ff.*`), which get int2 (3.11 bits on average: no single width of {2, 4, 8} averages 3 bits).
* `w4a8-mixed`, `w3a8-mixed`: the builder (metric-decoupled sensitivity -> HiGHS allocation over the default `k`
  sweep), `k` picked on 48 prompts of the **validation** set by the builder's default objective (mean per-image
  PSNR; ``--pick-objective``); budgets: 4.0 bits, and exactly the average of
  `w3a8-rule` (content and quality layers may both take {2, 4, 8} there, since {4, 8} cannot average below 4).

No prompt of the **test** set, which `mixdq eval` and `mixdq demo` use, is seen here.

    python examples/build_scenes_plans.py --only w4a8-uniform --balance --lowrank-rank 4 --out _work/scenes-bal-lr4

    python examples/build_scenes_plans.py --only w4a8-mixed --widths 2 3 4 5 6 8 --quality-widths 3 4 5 6 8 \
        --out _work/scenes-ladder

``--context uniform``: sensitivities measured inside the uniform plan. ``--outlier-fraction F``: outlier rows (stored once, at int8). ``--widths`` / ``--quality-widths``: the candidate widths of the mixed plans (the {2, 3, 4, 5, 6, 8} ladder needs
the native weight backend, picked automatically); ``--measure-widths``: measure only these, estimate the rest.

Correct-stage options (issue #14, off by default): ``--balance`` (channel balancing), ``--lowrank-rank R`` and
``--lowrank-layers PATTERN...`` (low-rank branches; a mixed plan's budget pays for them).

Refine-stage options of the mixed plans (`build_demo_plans.py`'s): ``--refine-evaluations N`` (0: off),
``--refine-objective psnr|tail|mse``, ``--no-refine-guard`` (keep proposals that add diverged images).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from build_demo_plans import add_refine_arguments, refine_settings
from diffusers_mixdq import BitPlan, demo
from diffusers_mixdq.builder import BuildSettings, build_plan, calibrated_plan
from diffusers_mixdq.builder.options import DEFAULT_ACTIVATION_MODE, DEFAULT_PICK_OBJECTIVE, activation_defaults
from diffusers_mixdq.families import family_of

#: calibrated plans: name -> (default weights, rules)
CALIBRATED = {
    "w8a8": ("int8", []),
    "w4a8-uniform": ("int4", []),
    "w3a8-rule": ("int4", [{"targets": ["*.ff.*"], "weights": "int2"}]),
}
#: mixed plans: name -> (budget: bits, or the name of the plan whose average it matches; extra settings)
MIXED = {
    "w4a8-mixed": (4.0, {}),
    "w3a8-mixed": ("w3a8-rule", {"widths": {"content": [2, 4, 8], "quality": [2, 4, 8]}}),
}
PLANS = (*CALIBRATED, *MIXED)


def calibrated(pipe, name: str, settings: BuildSettings, keep: list[str]) -> BitPlan:
    weights, rules = CALIBRATED[name]
    plan = BitPlan(defaults={"weights": weights, **activation_defaults(settings.activations)}, rules=rules, ignore=keep,
                   target={"base_model": "diffusers_mixdq/demo/scenes/pipeline"})
    plan = calibrated_plan(pipe, plan, settings, progress=False)
    return plan.resolve(pipe.transformer) if plan.rules else plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=PLANS, default=list(PLANS), metavar="PLAN")
    parser.add_argument("--pick-prompts", type=int, default=48, metavar="N",
                        help="mixed plans: pick k on N prompts of the validation set (default 48)")
    parser.add_argument("--out", type=Path, default=None, help="write the plans here (default: the bundled folder)")
    parser.add_argument("--cache-dir", type=Path, default=Path("_work/scenes_cache"),
                        help="calibration, sensitivity and refine cache shared by the mixed plans")
    parser.add_argument("--balance", action="store_true", help="channel balancing (the correct stage)")
    parser.add_argument("--lowrank-rank", type=int, default=0, metavar="R", help="low-rank branches of rank R")
    parser.add_argument("--lowrank-layers", nargs="+", default=[], metavar="PATTERN")
    parser.add_argument("--widths", nargs="+", type=int, default=None, metavar="BITS",
                        help="mixed plans: candidate widths of content layers, e.g. 2 3 4 5 6 8 (int3/5/6: native backend)")
    parser.add_argument("--quality-widths", nargs="+", type=int, default=None, metavar="BITS",
                        help="mixed plans: candidate widths of quality layers (default: as --widths)")
    parser.add_argument("--context", choices=("fp", "uniform"), default="fp",
                        help="mixed plans: measure sensitivities in full precision or inside the uniform plan")
    parser.add_argument("--outlier-fraction", type=float, default=0.0, metavar="F",
                        help="mixed plans: int8 rows for the F highest-kurtosis output channels of each layer")
    parser.add_argument("--measure-widths", nargs="+", type=int, default=None, metavar="BITS",
                        help="mixed plans: measure only these widths, estimate the other candidates")
    parser.add_argument("--activations", choices=("dynamic-token", "int8"), default=DEFAULT_ACTIVATION_MODE,
                        help="int8 inputs with a run-time range per token, or static calibrated ranges")
    parser.add_argument("--pick-objective", choices=("mse", "tail", "psnr"), default=DEFAULT_PICK_OBJECTIVE)
    add_refine_arguments(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = demo.get_model("scenes")
    pipe = DiffusionPipeline.from_pretrained(model.pipeline_path())
    pipe.set_progress_bar_config(disable=True)
    gen = model.generation_settings()
    settings = BuildSettings(prompts=demo.prompt_set("scenes", "calibration", 16), steps=gen["steps"],
                             guidance=gen["guidance"], height=gen["height"], width=gen["width"], seed=1000,
                             pipe_kwargs=gen["pipe_kwargs"], balance=args.balance, lowrank_rank=args.lowrank_rank,
                             lowrank_layers=tuple(args.lowrank_layers), activations=args.activations,
                             pick_objective=args.pick_objective)
    keep = list(family_of(pipe.transformer).first_last)
    out = args.out or Path(model.plans_dir())
    averages: dict[str, float] = {}
    for name in PLANS:
        if name not in args.only and not any(MIXED[m][0] == name for m in args.only if m in MIXED):
            continue
        t0 = time.perf_counter()
        if name in CALIBRATED:
            plan = calibrated(pipe, name, settings, keep)
        else:
            budget, extra = MIXED[name]
            if args.widths:
                extra = {**extra, "widths": {"content": args.widths, "quality": args.quality_widths or args.widths}}
            if args.measure_widths:
                extra = {**extra, "measure_widths": tuple(args.measure_widths)}
            if args.context != "fp":
                extra = {**extra, "context": args.context}
            if args.outlier_fraction:
                extra = {**extra, "outlier_fraction": args.outlier_fraction}
            budget = averages[budget] if isinstance(budget, str) else budget
            mixed = BuildSettings(**{**vars(settings), "weight_bits": budget, "protect_first_last": True,
                                     "cache_dir": str(args.cache_dir),
                                     "pick_prompts": demo.prompt_set("scenes", "validation", args.pick_prompts),
                                     **extra, **refine_settings(args)})
            plan, report = build_plan(pipe, mixed)
            plan.target["base_model"] = "diffusers_mixdq/demo/scenes/pipeline"
            print(json.dumps({"chosen_k": report.chosen_k, "denoiser_evaluations": report.denoiser_evaluations}))
        averages[name] = plan.summary().avg_weight_bits
        if name in args.only:
            plan.save(out / name)
            print(f"{name} in {time.perf_counter() - t0:.1f}s -> {out / name}")
            print(plan.summary())


if __name__ == "__main__":
    main()
