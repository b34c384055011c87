"""Joint denoiser + text-encoder plan vs a denoiser-only plan of the same total size, on a bundled model (issue #16;
BENCHMARKS.md "Text encoders in the builder").

    OMP_NUM_THREADS=1 python benchmarks/text_encoder_budget.py                  # shapes (UNet + CLIP)
    OMP_NUM_THREADS=1 python benchmarks/text_encoder_budget.py --model scenes   # scenes (PixArt DiT + T5)

Builds, with the settings of the model's bundled W4A8 mixed plan (16 calibration prompts, k picked on 48 validation
prompts, int8 static activations; scenes: the family's first / last layers in 16 bit), cache
``_work/<model>_cache``:

* ``_work/te_budget[-scenes]/joint-w4``: denoiser + text encoder under one 4.0-bit average over both (text-encoder
  candidates int4 / int8, weight-only);
* ``_work/te_budget[-scenes]/unet-same-size``: the denoiser alone, its budget set so that it and a 16-bit text
  encoder take the same bits as the joint plan set.

Then evaluate on held-out test prompts (the command is printed at the end).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusers import DiffusionPipeline

from diffusers_mixdq import demo
from diffusers_mixdq.builder import BuildSettings, build_plan
from diffusers_mixdq.builder.plan_set import build_plan_set
from diffusers_mixdq.plan import layer_table

BUDGET = 4.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("shapes", "scenes"), default="shapes")
    name = parser.parse_args().model
    torch.manual_seed(0)
    model = demo.get_model(name)
    pipe = DiffusionPipeline.from_pretrained(model.pipeline_path())
    pipe.set_progress_bar_config(disable=True)
    gen = model.generation_settings()
    common = dict(prompts=demo.prompt_set(name, "calibration", 16), steps=gen["steps"], guidance=gen["guidance"],
                  height=gen["height"], width=gen["width"], seed=1000, pipe_kwargs=gen["pipe_kwargs"],
                  pick_prompts=demo.prompt_set(name, "validation", 48), cache_dir=f"_work/{name}_cache",
                  protect_first_last=name == "scenes")
    out = Path("_work/te_budget" + ("" if name == "shapes" else f"-{name}"))
    denoiser_name = "unet" if name == "shapes" else "transformer"
    denoiser = getattr(pipe, denoiser_name)
    unet = sum(i.numel for i in layer_table(denoiser).values())
    te = sum(i.numel for i in layer_table(pipe.text_encoder).values())
    same_size = (BUDGET * (unet + te) - 16 * te) / unet
    t0 = time.perf_counter()
    plans, report = build_plan_set(pipe, BuildSettings(**common, weight_bits=BUDGET,
                                                        components=(denoiser_name, "text_encoder")))
    for component, plan in plans.items():
        plan.target["base_model"] = model.pipeline_path()
        plan.save(out / "joint-w4" / component)
    print(f"joint-w4 built in {time.perf_counter() - t0:.0f}s:",
          json.dumps(plans[denoiser_name].provenance["components"], indent=1))
    print(json.dumps({"seconds": report.seconds, "sample_evaluations": report.sample_evaluations,
                      "chosen_k": report.chosen_k}))
    t0 = time.perf_counter()
    plan, report = build_plan(pipe, BuildSettings(**common, weight_bits=same_size))
    plan.target["base_model"] = model.pipeline_path()
    plan.save(out / "unet-same-size" / denoiser_name)
    print(f"unet-same-size ({same_size:.3f} bits: denoiser {unet:,} + text encoder {te:,} parameters at 16 bit) built "
          f"in {time.perf_counter() - t0:.0f}s, {plan.summary().avg_weight_bits:.3f} bits, k = {report.chosen_k}")
    print(f"evaluate: OMP_NUM_THREADS=1 mixdq eval --model {name} --plan {out}/joint-w4 "
          f"--plan {out}/unet-same-size --plan w4a8-mixed --num-prompts 128 --no-memory "
          "--compare unet-same-size joint-w4 --compare w4a8-mixed joint-w4 "
          f"--json benchmarks/results/eval_te_budget_{name}_test128.json")


if __name__ == "__main__":
    main()
