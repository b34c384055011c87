"""Build the plans of the demo model: by default the two bundled ones (diffusers_mixdq/demo/plans/shapes/), W8A8 and
a W4A8 mixed plan; with ``--only``, any of those and three more used by the peer benchmark
(diffusers_mixdq/demo/plans/shapes-extra/).

    python examples/build_demo_plans.py                                   # w8a8 and w4a8-mixed (bundled)
    python examples/build_demo_plans.py --only w4a8-uniform w5a8-mixed w3a8-mixed   # extra plans (benchmarks)

W8A8: int8 weights, int8 static activations calibrated on 16 prompts, BOS-aware cross-attention K/V.
W4A8 mixed: the builder (calibration -> metric-decoupled sensitivity -> HiGHS allocation, average weight bits at
most 4.0, content widths {2, 4, 8}, quality {4, 8}) with the same activations. Calibration prompts are drawn with
another seed than the prompts `mixdq demo` evaluates on.
W4A8 uniform (extra): int4 weights everywhere with the same calibrated int8 activations as W8A8 (the
uniform baseline of the mixed plan, same layers, same activation quantization).
W5A8 mixed (extra): as W4A8 mixed with the average at most 5.0 bits.
W3A8 mixed (extra, below 4 bits): average at most 3.0 bits; quality layers may go to 2 bits too ({2, 4, 8}),
since {4, 8} cannot average below 4.
The extra mixed plans are built with the naive sensitivity protocol (``NAIVE``: every candidate width measured on
every calibration sample and prompt, as the bundled W4A8 plan was). They live outside plans/shapes/ so that
`mixdq demo` keeps showing the two bundled plans.
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

OUT = Path(demo.plans_dir("shapes"))
EXTRA = Path(demo.plans_dir("shapes-extra"))
BUNDLED = ("w8a8", "w4a8-mixed")
#: calibrated uniform plans: name -> (directory, weight dtype)
UNIFORM = {"w8a8": (OUT, "int8"), "w4a8-uniform": (EXTRA, "int4")}
#: the naive sensitivity protocol: every candidate measured on every calibration sample and prompt
NAIVE = {"sweep_fraction": 1.0, "content_fraction": 1.0, "extrapolate_widest": False}
#: mixed plans: name -> (directory, builder settings on top of the common ones)
MIXED = {
    "w4a8-mixed": (OUT, {"weight_bits": 4.0}),
    "w5a8-mixed": (EXTRA, {"weight_bits": 5.0, **NAIVE}),
    "w3a8-mixed": (EXTRA, {"weight_bits": 3.0, **NAIVE, "widths": {"content": [2, 4, 8], "quality": [2, 4, 8]}}),
}
PLANS = (*UNIFORM, *MIXED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=PLANS, default=list(BUNDLED), metavar="PLAN",
                        help=f"plans to (re)build, of {', '.join(PLANS)} (default: {' '.join(BUNDLED)})")
    args = parser.parse_args()

    torch.manual_seed(0)
    pipe = demo.load_pipeline()
    prompts = demo.eval_prompts(16, seed=1234)
    common = dict(prompts=prompts, steps=demo.NUM_INFERENCE_STEPS, guidance=demo.GUIDANCE_SCALE,
                  height=32, width=32, seed=1000)
    for name in (n for n in UNIFORM if n in args.only):
        out, weights = UNIFORM[name]
        t0 = time.perf_counter()
        plan = calibrated_plan(pipe, BitPlan(defaults={"weights": weights, "activations": "int8"},
                                             target={"base_model": "diffusers_mixdq/demo/pipeline"}),
                               BuildSettings(**common))
        plan.save(out / name)
        print(f"{name} calibrated in {time.perf_counter() - t0:.1f}s -> {out / name}")
        print(plan.summary())

    for name in (n for n in MIXED if n in args.only):
        out, extra = MIXED[name]
        t0 = time.perf_counter()
        settings = BuildSettings(**{**common, "prompts": prompts[:8]}, **extra)
        plan, report = build_plan(pipe, settings)
        plan.target["base_model"] = "diffusers_mixdq/demo/pipeline"
        plan.save(out / name)
        print(f"{name} built in {time.perf_counter() - t0:.1f}s -> {out / name}")
        print(plan.summary())
        print(json.dumps({"seconds": report.seconds, "denoiser_evaluations": report.denoiser_evaluations,
                          "chosen_k": report.chosen_k, "candidate_mse": report.candidate_mse}, indent=2))


if __name__ == "__main__":
    main()
