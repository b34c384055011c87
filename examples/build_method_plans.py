"""Build the ablation plans of the per-token, timestep-group and outlier-width stages (issue #14 items 3-5) on the
bundled ``shapes`` model, with the calibration settings of the bundled plans (examples/build_demo_plans.py):

    python examples/build_method_plans.py --out _work/plans                    # every variant
    python examples/build_method_plans.py --out _work/plans --only w8a4 w8a4-tg4
    python examples/build_method_plans.py --model scenes --out _work/plans-scenes --only w8a4 w8a4-token

On ``scenes`` (a PixArt DiT with a T5 encoder) the plans are calibrated as examples/build_scenes_plans.py calibrates
the bundled ones: its calibration prompt set, its generation settings, first and last layers kept in floating point.

Variant names: ``w{W}a{A}`` a uniform plan (int W weights, static int A activations calibrated per tensor), then
``-dyn`` dynamic per-tensor activations, ``-token`` dynamic per-token, ``-tg4`` static ranges per 4 timestep
groups (``-tg8``: 8, one per step of the shapes sampler), ``-omq5`` int8 rows for the 5% highest-kurtosis channels; ``w4a8-mixed*`` the builder's mixed plan at
an average of at most 4.0 weight bits (with ``-omq5`` the allocator gets 4.0 - 8 * 0.05 bits, so the plan with its
int8 rows stays within 4.0); ``w4a4-token-mixed`` the same build with int4 per-token activations.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from diffusers import DiffusionPipeline

from diffusers_mixdq import BitPlan, demo
from diffusers_mixdq.builder import BuildSettings, build_plan, calibrated_plan
from diffusers_mixdq.families import family_of

#: uniform variants: name -> (weight dtype, activation dtype, act_range or None for calibrated, stage settings)
UNIFORM = {
    "w4a8": ("int4", "int8", None, {}),
    "w4a8-tg4": ("int4", "int8", None, {"act_timestep_groups": 4}),
    "w4a8-token": ("int4", "int8", "dynamic-token", {}),
    "w4a8-omq5": ("int4", "int8", None, {"outlier_fraction": 0.05}),
    "w8a8": ("int8", "int8", None, {}),
    "w8a8-token": ("int8", "int8", "dynamic-token", {}),
    "w8a4": ("int8", "int4", None, {}),
    "w8a4-tg4": ("int8", "int4", None, {"act_timestep_groups": 4}),
    "w8a4-tg8": ("int8", "int4", None, {"act_timestep_groups": 8}),
    "w8a4-dyn": ("int8", "int4", "dynamic", {}),
    "w8a4-token": ("int8", "int4", "dynamic-token", {}),
    "w4a4-token": ("int4", "int4", "dynamic-token", {}),
    "w4a4-token-omq5": ("int4", "int4", "dynamic-token", {"outlier_fraction": 0.05}),
}
#: mixed variants: name -> builder settings on top of the common ones
#: (pinned to the builder's defaults before issue #14 switched them: static int8 inputs, k picked by mean MSE, no
#: refine stage)
OLD_DEFAULTS = {"activations": "int8", "pick_objective": "mse", "refine_evaluations": 0}
MIXED = {
    "w4a8-mixed": {**OLD_DEFAULTS, "weight_bits": 4.0},
    "w4a8-mixed-omq5": {**OLD_DEFAULTS, "weight_bits": 4.0, "outlier_fraction": 0.05},
    "w4a4-token-mixed": {"weight_bits": 4.0, "activations": "dynamic-token", "act_widths": [4],
                         "pick_objective": "mse", "refine_evaluations": 0},
}


def setup(model_name: str):
    """(pipeline, common builder settings, layers kept in floating point) of a bundled model's plans."""
    if model_name == "shapes":
        common = dict(prompts=demo.eval_prompts(16, seed=1234), steps=demo.NUM_INFERENCE_STEPS,
                      guidance=demo.GUIDANCE_SCALE, height=32, width=32, seed=1000)
        return demo.load_pipeline(), common, []
    model = demo.get_model(model_name)
    pipe = DiffusionPipeline.from_pretrained(model.pipeline_path())
    pipe.set_progress_bar_config(disable=True)
    gen = model.generation_settings()
    common = dict(prompts=demo.prompt_set(model_name, "calibration", 16), steps=gen["steps"],
                  guidance=gen["guidance"], height=gen["height"], width=gen["width"], seed=1000,
                  pipe_kwargs=gen["pipe_kwargs"])
    return pipe, common, list(family_of(pipe.transformer).first_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=[*UNIFORM, *MIXED], default=[*UNIFORM, *MIXED])
    parser.add_argument("--model", choices=("shapes", "scenes"), default="shapes")
    parser.add_argument("--out", type=Path, required=True, help="directory for the plans (e.g. _work/plans)")
    args = parser.parse_args()
    pipe, common, keep = setup(args.model)
    prompts = common["prompts"]
    target = {"base_model": f"diffusers_mixdq/demo/{args.model}"}
    for name in (n for n in UNIFORM if n in args.only):
        weights, acts, act_range, stages = UNIFORM[name]
        defaults = {"weights": weights, "activations": acts, **({"act_range": act_range} if act_range else {})}
        t0 = time.perf_counter()
        plan = calibrated_plan(pipe, BitPlan(defaults=defaults, ignore=keep or None, target=target),
                               BuildSettings(**common, **stages), progress=False)
        plan.save(args.out / name)
        print(f"{name}: {time.perf_counter() - t0:.1f}s, {plan.summary().avg_weight_bits:.2f} weight bits")
    for name in (n for n in MIXED if n in args.only):
        t0 = time.perf_counter()
        plan, _ = build_plan(pipe, BuildSettings(**{**common, "prompts": prompts[:8], **MIXED[name]}), progress=False)
        plan.target.update(target)
        plan.save(args.out / name)
        print(f"{name}: {time.perf_counter() - t0:.1f}s, {plan.summary().avg_weight_bits:.2f} weight bits")


if __name__ == "__main__":
    main()
