"""Build the plans of the demo model: by default the two bundled ones (diffusers_mixdq/demo/plans/shapes/), W8A8 and
a W4A8 mixed plan; with ``--only``, any of those and three more used by the peer benchmark
(diffusers_mixdq/demo/plans/shapes-extra/).

    python examples/build_demo_plans.py                                   # w8a8 and w4a8-mixed (bundled)
    python examples/build_demo_plans.py --only w4a8-uniform w5a8-mixed w3a8-mixed   # extra plans (benchmarks)
    python examples/build_demo_plans.py --only w4a8-mixed --pick-objective tail --out _work/plans

W8A8: int8 weights, int8 activations with the builder's default range (``--activations``: ``dynamic-token``, a
run-time range per token, or ``int8``, static ranges calibrated on 16 prompts as the plans bundled before issue
#14), BOS-aware cross-attention K/V.
W4A8 mixed: the builder (calibration -> metric-decoupled sensitivity -> HiGHS allocation, average weight bits at
most 4.0, content widths {2, 4, 8}, quality {4, 8}, ``k`` picked by the builder's default objective, mean per-image
PSNR) with the same activations.
W4A8 uniform (extra): int4 weights everywhere with the same int8 activations as W8A8 (the uniform baseline of the
mixed plan, same layers, same activation quantization).
W5A8 mixed (extra): as W4A8 mixed with the average at most 5.0 bits.
W3A8 mixed (extra, below 4 bits): average at most 3.0 bits; quality layers may go to 2 bits too ({2, 4, 8}),
since {4, 8} cannot average below 4.
Every mixed plan uses the builder's default sensitivity protocol; ``--cache-dir`` (default ``_work/shapes_cache``)
keeps the calibration and the sensitivities, so the plans after the first reuse them. The extra plans live outside
plans/shapes/ so that `mixdq demo` keeps showing the two bundled plans.

Prompts (issue #13 / #14): every plan is calibrated on the first 16 prompts of the model's **calibration** set
(``demo.prompt_set("shapes", "calibration", 16)``) and mixed plans pick ``k`` on ``--pick-prompts`` (default 48)
prompts of its **validation** set, so no prompt of the **test** set that `mixdq eval` and `mixdq demo` use is
seen by the builder. Allocator options: ``--pick-objective tail`` picks by the worst 10% of images (``mse``: by
the mean per-image MSE, the default before issue #14);
``--protect-first-last`` keeps conv_in / conv_out in 16 bit; ``--split-ratios`` sets the ``k`` sweep (default:
the builder's eleven ratios); ``--context uniform``, ``--pick-uniform``, ``--content-metric mse`` and
``--pick-objective`` are the builder options of the same names (BENCHMARKS.md, issue #14); ``--out DIR``
writes every plan under DIR instead of the bundled folders. ``--ladder 4`` / ``--ladder 3`` use the int3 / int5 / int6
widths too (content {2, 3, 4, 5, 6, 8}; quality from 3 or 2 bits), ``--measure-widths 2 4 8`` measures only those.

Correct-stage options (issue #14, off by default): ``--balance`` (channel balancing), ``--lowrank-rank R`` (low-rank
branches; a mixed plan's budget pays for them; ``--lowrank-layers PATTERN...`` limits them to some layers),
``--distill-seconds S`` (adapters distilled against full precision).

Refine-stage options of the mixed plans (the builder's defaults when left out): ``--refine-evaluations N`` (0: off),
``--refine-objective psnr|tail|mse``, ``--no-refine-guard`` (keep proposals that add diverged images or worsen the
tail, as before issue #14's guard).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusers_mixdq import BitPlan
from diffusers_mixdq import demo
from diffusers_mixdq.builder import BuildSettings, build_plan, calibrated_plan
from diffusers_mixdq.builder.allocate import PICK_OBJECTIVES
from diffusers_mixdq.builder.options import DEFAULT_ACTIVATION_MODE, DEFAULT_PICK_OBJECTIVE, activation_defaults

OUT = Path(demo.plans_dir("shapes"))
EXTRA = Path(demo.plans_dir("shapes-extra"))
BUNDLED = ("w8a8", "w4a8-mixed")
#: calibrated uniform plans: name -> (directory, weight dtype)
UNIFORM = {"w8a8": (OUT, "int8"), "w4a8-uniform": (EXTRA, "int4")}
#: mixed plans: name -> (directory, builder settings on top of the common ones)
MIXED = {
    "w4a8-mixed": (OUT, {"weight_bits": 4.0}),
    "w5a8-mixed": (EXTRA, {"weight_bits": 5.0}),
    "w3a8-mixed": (EXTRA, {"weight_bits": 3.0, "widths": {"content": [2, 4, 8], "quality": [2, 4, 8]}}),
}
PLANS = (*UNIFORM, *MIXED)


def allocator_settings(args: argparse.Namespace) -> dict:
    """The builder settings of the allocator options (none of them: the bundled plans' settings)."""
    extra: dict = {"pick_objective": args.pick_objective, "protect_first_last": args.protect_first_last,
                   "pick_prompts": demo.prompt_set("shapes", "validation", args.pick_prompts),
                   "cache_dir": str(args.cache_dir), "context": args.context, "pick_uniform": args.pick_uniform,
                   "content_metric": args.content_metric}
    if args.split_ratios:
        extra["split_ratios"] = tuple(args.split_ratios)
    if args.ladder:  # the int3 / int5 / int6 ladder (native weight backend, picked automatically)
        extra["widths"] = {"content": [2, 3, 4, 5, 6, 8], "quality": [3, 4, 5, 6, 8] if args.ladder == "4" else
                           [2, 3, 4, 5, 6, 8]}
    if args.measure_widths:
        extra["measure_widths"] = tuple(args.measure_widths)
    return extra


def correction_settings(args: argparse.Namespace) -> dict:
    """The builder settings of the correct and distill stages (none of them: the bundled plans' settings)."""
    return {"balance": args.balance, "lowrank_rank": args.lowrank_rank, "lowrank_layers": tuple(args.lowrank_layers),
            "distill_seconds": args.distill_seconds}


def add_refine_arguments(parser: argparse.ArgumentParser) -> None:
    """The refine stage's options of the mixed plans (none of them: the builder's defaults)."""
    parser.add_argument("--refine-evaluations", type=int, default=None, metavar="N",
                        help="mixed plans: at most N whole-plan evaluations in the refine stage (0: off; default 16)")
    parser.add_argument("--refine-objective", choices=PICK_OBJECTIVES, default=None,
                        help="mixed plans: the refine stage's objective (default: the pick's)")
    parser.add_argument("--no-refine-guard", action="store_true",
                        help="mixed plans: keep refine proposals that add diverged images or worsen the tail")


def refine_settings(args: argparse.Namespace) -> dict:
    """The builder settings of :func:`add_refine_arguments`' options."""
    return {"refine_evaluations": args.refine_evaluations, "refine_objective": args.refine_objective,
            "refine_guard": not args.no_refine_guard}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=PLANS, default=list(BUNDLED), metavar="PLAN",
                        help=f"plans to (re)build, of {', '.join(PLANS)} (default: {' '.join(BUNDLED)})")
    parser.add_argument("--pick-prompts", type=int, default=48, metavar="N",
                        help="mixed plans: pick k on N prompts of the validation set (default 48)")
    parser.add_argument("--pick-objective", choices=("mse", "tail", "psnr"), default=DEFAULT_PICK_OBJECTIVE)
    parser.add_argument("--activations", choices=("dynamic-token", "int8"), default=DEFAULT_ACTIVATION_MODE,
                        help="int8 inputs with a run-time range per token, or static calibrated ranges")
    parser.add_argument("--context", choices=("fp", "uniform"), default="fp")
    parser.add_argument("--pick-uniform", action="store_true")
    parser.add_argument("--content-metric", choices=("ssim", "mse"), default="ssim")
    parser.add_argument("--protect-first-last", action="store_true")
    parser.add_argument("--ladder", choices=("4", "3"), default=None,
                        help="mixed plans: candidate widths {2, 3, 4, 5, 6, 8} (quality layers from 3 bits for "
                             "'4', from 2 for '3', the sub-4-bit budgets)")
    parser.add_argument("--measure-widths", type=int, nargs="+", default=None, metavar="BITS",
                        help="measure only these candidate widths, estimate the others")
    parser.add_argument("--split-ratios", type=float, nargs="+", default=None, metavar="K")
    parser.add_argument("--cache-dir", type=Path, default=Path("_work/shapes_cache"),
                        help="calibration and sensitivity cache shared by the mixed plans")
    parser.add_argument("--out", type=Path, default=None, help="write the plans here (default: the bundled folders)")
    parser.add_argument("--balance", action="store_true", help="channel balancing (the correct stage)")
    parser.add_argument("--lowrank-rank", type=int, default=0, metavar="R",
                        help="low-rank branches of rank R (mixed plans: the budget pays for them)")
    parser.add_argument("--lowrank-layers", nargs="+", default=[], metavar="PATTERN",
                        help="only these layers get low-rank branches (default: every quantized one)")
    parser.add_argument("--distill-seconds", type=float, default=0.0, metavar="S",
                        help="train rank-4 adapters (on the --lowrank-layers) against full precision for S seconds")
    add_refine_arguments(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    pipe = demo.load_pipeline()
    prompts = demo.prompt_set("shapes", "calibration", 16)
    common = dict(prompts=prompts, steps=demo.NUM_INFERENCE_STEPS, guidance=demo.GUIDANCE_SCALE,
                  height=32, width=32, seed=1000, activations=args.activations)
    for name in (n for n in UNIFORM if n in args.only):
        out, weights = UNIFORM[name]
        out = args.out or out
        t0 = time.perf_counter()
        plan = calibrated_plan(pipe, BitPlan(defaults={"weights": weights, **activation_defaults(args.activations)},
                                             target={"base_model": "diffusers_mixdq/demo/pipeline"}),
                               BuildSettings(**common, **correction_settings(args)))
        plan.save(out / name)
        print(f"{name} calibrated in {time.perf_counter() - t0:.1f}s -> {out / name}")
        print(plan.summary())

    for name in (n for n in MIXED if n in args.only):
        out, extra = MIXED[name]
        out = args.out or out
        t0 = time.perf_counter()
        settings = BuildSettings(**{**common, **extra, **allocator_settings(args), **correction_settings(args),
                                    **refine_settings(args)})
        plan, report = build_plan(pipe, settings)
        plan.target["base_model"] = "diffusers_mixdq/demo/pipeline"
        plan.save(out / name)
        print(f"{name} built in {time.perf_counter() - t0:.1f}s -> {out / name}")
        print(plan.summary())
        print(json.dumps({"seconds": report.seconds, "denoiser_evaluations": report.denoiser_evaluations,
                          "chosen_k": report.chosen_k, "candidate_mse": report.candidate_mse,
                          "candidate_score": report.candidate_score}, indent=2))


if __name__ == "__main__":
    main()
