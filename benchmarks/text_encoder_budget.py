"""Joint denoiser + text-encoder plan vs a denoiser-only plan of the same total size, on the bundled shapes model
(issue #16; BENCHMARKS.md "Text encoders in the builder").

    OMP_NUM_THREADS=1 python benchmarks/text_encoder_budget.py            # builds both plan sets, ~5 min with the cache

Builds, with the settings of the bundled W4A8 mixed plan (16 calibration prompts, k picked on 48 validation
prompts, int8 static activations, cache ``_work/shapes_cache`` shared with examples/build_demo_plans.py):

* ``_work/te_budget/joint-w4``: UNet + text encoder under one 4.0-bit average over both (text-encoder candidates
  int4 / int8, weight-only);
* ``_work/te_budget/unet-same-size``: the UNet alone, its budget set so that UNet + a 16-bit text encoder take the
  same bits as the joint plan set.

Then evaluate on held-out test prompts (the command is printed at the end).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from diffusers_mixdq import demo
from diffusers_mixdq.builder import BuildSettings, build_plan
from diffusers_mixdq.builder.plan_set import build_plan_set
from diffusers_mixdq.plan import layer_table

OUT = Path("_work/te_budget")
BUDGET = 4.0


def main() -> None:
    torch.manual_seed(0)
    pipe = demo.load_pipeline()
    common = dict(prompts=demo.prompt_set("shapes", "calibration", 16), steps=demo.NUM_INFERENCE_STEPS,
                  guidance=demo.GUIDANCE_SCALE, height=32, width=32, seed=1000,
                  pick_prompts=demo.prompt_set("shapes", "validation", 48), cache_dir="_work/shapes_cache")
    unet = sum(i.numel for i in layer_table(pipe.unet).values())
    te = sum(i.numel for i in layer_table(pipe.text_encoder).values())
    same_size = (BUDGET * (unet + te) - 16 * te) / unet
    t0 = time.perf_counter()
    plans, report = build_plan_set(pipe, BuildSettings(**common, weight_bits=BUDGET,
                                                        components=("unet", "text_encoder")))
    for component, plan in plans.items():
        plan.target["base_model"] = "diffusers_mixdq/demo/pipeline"
        plan.save(OUT / "joint-w4" / component)
    print(f"joint-w4 built in {time.perf_counter() - t0:.0f}s:",
          json.dumps(plans["unet"].provenance["components"], indent=1))
    print(json.dumps({"seconds": report.seconds, "sample_evaluations": report.sample_evaluations,
                      "chosen_k": report.chosen_k}))
    t0 = time.perf_counter()
    plan, report = build_plan(pipe, BuildSettings(**common, weight_bits=same_size))
    plan.target["base_model"] = "diffusers_mixdq/demo/pipeline"
    plan.save(OUT / "unet-same-size" / "unet")
    print(f"unet-same-size ({same_size:.3f} bits: UNet {unet:,} + text encoder {te:,} parameters at 16 bit) built "
          f"in {time.perf_counter() - t0:.0f}s, {plan.summary().avg_weight_bits:.3f} bits, k = {report.chosen_k}")
    print("evaluate: OMP_NUM_THREADS=1 mixdq eval --model shapes --plan _work/te_budget/joint-w4 "
          "--plan _work/te_budget/unet-same-size --plan w4a8-mixed --num-prompts 128 --no-memory "
          "--compare unet-same-size joint-w4 --compare w4a8-mixed joint-w4 "
          "--json benchmarks/results/eval_te_budget_shapes_test128.json")


if __name__ == "__main__":
    main()
