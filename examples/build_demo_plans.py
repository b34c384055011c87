"""Build the bundled plans of the demo model (hub_recipes/demo-shapes/): W8A8 and a W4A8 mixed plan.

    python examples/build_demo_plans.py

W8A8: int8 weights, int8 static activations calibrated on 16 prompts, BOS-aware cross-attention K/V.
W4A8 mixed: the builder (calibration -> metric-decoupled sensitivity -> HiGHS allocation, average weight bits at
most 4.0, content widths {2, 4, 8}, quality {4, 8}) with the same activations. Calibration prompts are drawn with
another seed than the prompts `mixdq demo` evaluates on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from diffusers_mixdq import BitPlan
from diffusers_mixdq import demo
from diffusers_mixdq.build import BuildSettings, build_plan, calibrated_plan

OUT = Path(__file__).resolve().parent.parent / "hub_recipes" / "demo-shapes"


def main() -> None:
    torch.manual_seed(0)
    pipe = demo.load_pipeline()
    prompts = demo.eval_prompts(16, seed=1234)
    common = dict(prompts=prompts, steps=demo.NUM_INFERENCE_STEPS, guidance=demo.GUIDANCE_SCALE,
                  height=32, width=32, seed=1000)
    t0 = time.perf_counter()
    w8a8 = calibrated_plan(pipe, BitPlan(defaults={"weights": "int8", "activations": "int8"},
                                         target={"base_model": "diffusers_mixdq/demo/pipeline"}),
                           BuildSettings(**common))
    w8a8.save(OUT / "w8a8")
    print(f"W8A8 calibrated in {time.perf_counter() - t0:.1f}s")
    print(w8a8.summary())

    t0 = time.perf_counter()
    settings = BuildSettings(**{**common, "prompts": prompts[:8]}, weight_bits=4.0)
    plan, report = build_plan(pipe, settings)
    plan.target["base_model"] = "diffusers_mixdq/demo/pipeline"
    plan.save(OUT / "w4a8-mixed")
    print(f"W4A8 mixed built in {time.perf_counter() - t0:.1f}s")
    print(plan.summary())
    print(json.dumps({"seconds": report.seconds, "denoiser_evaluations": report.denoiser_evaluations,
                      "chosen_k": report.chosen_k, "candidate_mse": report.candidate_mse}, indent=2))


if __name__ == "__main__":
    main()
