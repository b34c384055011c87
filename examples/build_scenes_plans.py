"""Build the bundled plans of the `scenes` demo model (diffusers_mixdq/demo/plans/scenes/): W8A8 and W4A8 uniform.

    python examples/build_scenes_plans.py

Both are calibrated (static int8 input ranges) on the model's calibration prompt set, with the family's first and
last layers (`pos_embed.proj`, `proj_out`) kept in floating point, and the pipeline arguments of its
`defaults.json` (PixArt at 32 px: no resolution binning, 16-token captions). The text encoder is T5 (not causal),
so no layer is BOS-aware. Mixed plans for scenes are still to be built (issue #13 / #14).

    python examples/build_scenes_plans.py --only w4a8-uniform --balance --lowrank-rank 4 --out _work/scenes-bal-lr4

Correct-stage options (issue #14, off by default): ``--balance`` (channel balancing), ``--lowrank-rank R`` and
``--lowrank-layers PATTERN...`` (low-rank branches), ``--out DIR`` (instead of the bundled folder).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from diffusers_mixdq import BitPlan, demo
from diffusers_mixdq.builder import BuildSettings, calibrated_plan
from diffusers_mixdq.families import family_of

UNIFORM = {"w8a8": "int8", "w4a8-uniform": "int4"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(UNIFORM), default=list(UNIFORM), metavar="PLAN")
    parser.add_argument("--balance", action="store_true", help="channel balancing (the correct stage)")
    parser.add_argument("--lowrank-rank", type=int, default=0, metavar="R", help="low-rank branches of rank R")
    parser.add_argument("--lowrank-layers", nargs="+", default=[], metavar="PATTERN")
    parser.add_argument("--out", type=Path, default=None, help="write the plans here (default: the bundled folder)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model = demo.get_model("scenes")
    pipe = DiffusionPipeline.from_pretrained(model.pipeline_path())
    pipe.set_progress_bar_config(disable=True)
    gen = model.generation_settings()
    settings = BuildSettings(prompts=demo.prompt_set("scenes", "calibration", 16), steps=gen["steps"],
                             guidance=gen["guidance"], height=gen["height"], width=gen["width"], seed=1000,
                             pipe_kwargs=gen["pipe_kwargs"], balance=args.balance, lowrank_rank=args.lowrank_rank,
                             lowrank_layers=tuple(args.lowrank_layers))
    keep = list(family_of(pipe.transformer).first_last)
    out = args.out or Path(model.plans_dir())
    for name, weights in ((n, w) for n, w in UNIFORM.items() if n in args.only):
        t0 = time.perf_counter()
        plan = BitPlan(defaults={"weights": weights, "activations": "int8"}, ignore=keep,
                       target={"base_model": "diffusers_mixdq/demo/scenes/pipeline"})
        plan = calibrated_plan(pipe, plan, settings, progress=False)
        plan.save(out / name)
        print(f"{name} calibrated in {time.perf_counter() - t0:.1f}s -> {out / name}")
        print(plan.summary())


if __name__ == "__main__":
    main()
