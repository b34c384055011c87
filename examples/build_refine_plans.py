"""Build the plans of BENCHMARKS.md "Refinement (issue 14)" on a bundled demo model:

    python examples/build_refine_plans.py --model scenes --out _work/refine/scenes
    python examples/build_refine_plans.py --model shapes --out _work/refine/shapes --only w4a8-mixed w4a8-refine

As the bundled W4A8 mixed plan is built (examples/build_ablation_plans.py's baseline: the first 16 prompts of the
model's **calibration** set, at most 4.0 weight bits, content {2, 4, 8}, quality {4, 8}, ``k`` picked on 48
prompts of its **validation** set; on ``scenes`` the first / last layers in floating point), with per-token
activations and the pick by mean per-image PSNR (``activations: dynamic-token``, ``pick_objective: psnr``, said
explicitly whatever the builder's defaults). ``w4a8-refine`` adds the refine stage (``--evaluations``,
``--rounds``); ``w4a8-uniform``: int4 weights everywhere, per-token activations (the same-size reference);
``w3a8-mixed`` / ``w3a8-refine``: at most 3.0 bits, {2, 4, 8} for both groups. No prompt of the **test** set
(``mixdq eval``) is seen. The mixed builds share ``--cache-dir``; each build's cost (denoiser sample-evaluations by
phase) goes to ``<out>/builds.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from build_ablation_plans import uniform
from build_w3a4_plans import setup
from diffusers_mixdq import demo
from diffusers_mixdq.builder import BuildSettings, build_plan

TOKEN = {"activations": "dynamic-token", "pick_objective": "psnr"}
W3 = {"weight_bits": 3.0, "widths": {"content": [2, 4, 8], "quality": [2, 4, 8]}}
#: the width ladder, only {2, 4, 8} measured by the measure stage (the refine stage measures in the plan)
LADDER = {"widths": {"content": [2, 3, 4, 5, 6, 8], "quality": [3, 4, 5, 6, 8]}, "measure_widths": (2, 4, 8)}
W3_LADDER = {"weight_bits": 3.0, "widths": {"content": [2, 3, 4, 5, 6, 8], "quality": [2, 3, 4, 5, 6, 8]},
             "measure_widths": (2, 4, 8)}
#: mixed plans: name -> builder settings on top of the common ones (refine settings added from the command line)
MIXED = {"w4a8-mixed": {}, "w4a8-refine": {"refine": True}, "w4a8-ladder": LADDER,
         "w4a8-ladder-refine": {**LADDER, "refine": True},
         "w4a8-ladder-refine-pu": {**LADDER, "pick_uniform": True, "refine": True},
         "w3a8-mixed": W3, "w3a8-refine": {**W3, "refine": True},
         "w3a8-ladder-refine": {**W3_LADDER, "refine": True}}
PLANS = ("w4a8-uniform", *MIXED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("shapes", "scenes"), default="scenes")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="+", choices=PLANS, default=list(PLANS[:3]), metavar="PLAN")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: <out>/cache")
    parser.add_argument("--evaluations", type=int, default=16, help="refine: whole-plan evaluations (default 16)")
    parser.add_argument("--rounds", type=int, default=1, help="refine: in-plan measuring rounds (default 1)")
    args = parser.parse_args()

    torch.manual_seed(0)
    pipe, common, keep, base = setup(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in (n for n in PLANS if n in args.only):
        t0 = time.perf_counter()
        record: dict = {"variant": name}
        if name == "w4a8-uniform":
            plan = uniform(pipe, "int4", "dynamic-token", common, keep, base)
        else:
            extra = dict(MIXED[name])
            refined = extra.pop("refine", False)  # the unrefined rows pin it off (a default since issue #14)
            extra.update(refine_evaluations=args.evaluations if refined else 0, refine_rounds=args.rounds)
            settings = BuildSettings(**{**common, "weight_bits": 4.0, **TOKEN, "protect_first_last": bool(keep),
                                        "cache_dir": str(args.cache_dir or args.out / "cache"),
                                        "pick_prompts": demo.prompt_set(args.model, "validation", 48), **extra})
            plan, report = build_plan(pipe, settings, progress=False)
            plan.target["base_model"] = base
            record.update(chosen_k=report.chosen_k, sample_evaluations=report.sample_evaluations,
                          reused_sample_evaluations=report.reused_sample_evaluations,
                          method_sample_evaluations=report.method_sample_evaluations,
                          refine={k: v for k, v in plan.provenance.get("refine", {}).items() if k != "kept"},
                          kept=len(plan.provenance.get("refine", {}).get("kept", [])))
        plan.save(args.out / name)
        record.update(seconds=round(time.perf_counter() - t0, 1), avg_weight_bits=plan.summary().avg_weight_bits)
        with (args.out / "builds.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
