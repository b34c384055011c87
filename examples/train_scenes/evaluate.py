"""Measure the ``scenes`` pipeline's text alignment, in full precision and under uniform MixDQ plans.

One image per prompt of the **test** prompt set
(``diffusers_mixdq.demo.scenes_data.test_prompts(n)``); batch ``i`` (of
``--batch-size`` prompts) uses ``torch.Generator().manual_seed(seed + i)``.
The scenes scorer compares each image with its prompt (per-attribute and
``all`` = aligned).  Each variant reuses the same seeds, so variants are
paired image by image.

Variants (``--variants``):

* ``fp``: the pipeline as stored (fp32);
* ``w8a8``: ``BitPlan.uniform("int8", "int8", dynamic)``;
* ``w4a8``: ``BitPlan.uniform("int4", "int8", dynamic)``;
* ``w3a8``: int4 weights everywhere except the feed-forward layers
  (``*.ff.*``), which get int2 -- about 3 bits per weight on average over the blocks;
* ``w2a8``: ``BitPlan.uniform("int2", "int8", dynamic)``;

all with ``--ignore`` (default: the patch embedding ``pos_embed.proj`` and
the output projection ``proj_out``) kept in floating point.

Example (the numbers in the model card)::

    OMP_NUM_THREADS=1 python examples/train_scenes/evaluate.py --n 256 \
        --variants fp w8a8 w4a8 w3a8 --json _work/eval_scenes.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from diffusers_mixdq.demo import scenes_data as data  # noqa: E402
from diffusers_mixdq.demo.scenes_scorer import SCORE_KEYS, frechet_distance, load_scorer  # noqa: E402

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "diffusers_mixdq", "demo", "scenes")
DEFAULT_PIPELINE = os.path.abspath(os.path.join(_DEMO, "pipeline"))
DEFAULT_SCORER = os.path.abspath(os.path.join(_DEMO, "scorer"))
DEFAULT_DEFAULTS = os.path.abspath(os.path.join(_DEMO, "defaults.json"))


def make_plan(variant: str, ignore):
    from diffusers_mixdq import BitPlan

    if variant == "w8a8":
        return BitPlan.uniform(weights="int8", activations="int8", act_range="dynamic", ignore=ignore)
    if variant == "w4a8":
        return BitPlan.uniform(weights="int4", activations="int8", act_range="dynamic", ignore=ignore)
    if variant == "w2a8":
        return BitPlan.uniform(weights="int2", activations="int8", act_range="dynamic", ignore=ignore)
    if variant == "w3a8":
        return BitPlan.uniform(
            weights="int4", activations="int8", act_range="dynamic", ignore=ignore,
            rules=[{"targets": ["*.ff.*"], "weights": "int2", "note": "feed-forwards int2 -> ~3 bits on average"}],
        )  # fmt: skip
    raise ValueError(f"unknown variant {variant!r}")


def load_variant(path: str, variant: str, ignore):
    from diffusers import DiffusionPipeline, PixArtTransformer2DModel

    if variant == "fp":
        pipe = DiffusionPipeline.from_pretrained(path, dtype=torch.float32)
        info = {}
    else:
        from diffusers_mixdq import MixDQConfig

        plan = make_plan(variant, ignore)
        tr = PixArtTransformer2DModel.from_pretrained(
            path, subfolder="transformer", quantization_config=MixDQConfig(plan=plan)
        )
        pipe = DiffusionPipeline.from_pretrained(path, transformer=tr, dtype=torch.float32)
        try:
            summary = plan.resolve(PixArtTransformer2DModel.from_pretrained(path, subfolder="transformer")).summary()
            info = {"plan_summary": summary if isinstance(summary, (dict, str)) else str(summary)}
        except Exception as e:  # summary is informative only
            info = {"plan_summary_error": repr(e)}
    pipe.set_progress_bar_config(disable=True)
    return pipe, info


@torch.no_grad()
def generate(pipe, prompts, steps, guidance, seed, batch_size, max_sequence_length=16) -> torch.Tensor:
    out = []
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        res = pipe(
            prompts[start : start + batch_size],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed + i),
            output_type="pt",
            use_resolution_binning=False,
            clean_caption=False,
            max_sequence_length=max_sequence_length,
        )
        out.append(res.images.float().cpu())
    return torch.cat(out)


def save_grid(images: torch.Tensor, ncols: int, path: str, upscale: int = 4) -> None:
    from PIL import Image

    n, _, h, w = images.shape
    nrows = (n + ncols - 1) // ncols
    gap = 2
    hh, ww = h * upscale, w * upscale
    canvas = np.full((nrows * (hh + gap) + gap, ncols * (ww + gap) + gap, 3), 255, dtype=np.uint8)
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    arr = arr.repeat(upscale, axis=1).repeat(upscale, axis=2)
    for k in range(n):
        r, c = divmod(k, ncols)
        y, x = gap + r * (hh + gap), gap + c * (ww + gap)
        canvas[y : y + hh, x : x + ww] = arr[k]
    Image.fromarray(canvas).save(path, optimize=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE)
    p.add_argument("--scorer", default=DEFAULT_SCORER)
    p.add_argument("--n", type=int, default=256, help="number of test prompts")
    p.add_argument("--prompt-set", default="test", choices=["calibration", "validation", "test"])
    p.add_argument("--seed", type=int, default=0, help="generation seed")
    p.add_argument("--steps", type=int, nargs="+", default=None)
    p.add_argument("--guidance", type=float, nargs="+", default=None)
    p.add_argument("--variants", nargs="+", default=["fp"])
    p.add_argument("--ignore", nargs="*", default=["pos_embed.proj", "proj_out"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--grid", default=None, help="PNG grid of DEMO_PROMPTS x 4 seeds (first variant/setting)")
    p.add_argument("--fd", action="store_true", help="also compute the Fréchet distance to rendered images")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    with open(DEFAULT_DEFAULTS) as f:
        defaults = json.load(f)
    steps_list = args.steps or [defaults["num_inference_steps"]]
    guid_list = args.guidance or [defaults["guidance_scale"]]
    msl = defaults.get("max_sequence_length", 16)
    scorer = load_scorer(args.scorer)
    sets = data.prompt_sets(**{f"n_{k}": (args.n if k == args.prompt_set else 1)
                               for k in ("calibration", "validation", "test")})  # fmt: skip
    prompts = sets[args.prompt_set]

    feats_real = fd_floor = None
    if args.fd:
        real_a = torch.from_numpy(data.render_batch(data.sample_scenes(args.n, seed=10_000)))
        real_b = torch.from_numpy(data.render_batch(data.sample_scenes(args.n, seed=20_000)))
        feats_real = scorer.features(real_a)
        fd_floor = frechet_distance(feats_real, scorer.features(real_b))

    results = dict(pipeline=os.path.relpath(args.pipeline), n=args.n, prompt_set=args.prompt_set, seed=args.seed,
                   ignore=args.ignore, fd_real_vs_real=fd_floor, runs=[])  # fmt: skip
    grid_done = False
    for variant in args.variants:
        pipe, info = load_variant(args.pipeline, variant, args.ignore)
        for steps in steps_list:
            for g in guid_list:
                t0 = time.time()
                images = generate(pipe, prompts, steps, g, args.seed, args.batch_size, msl)
                sec = time.time() - t0
                acc = scorer.score(images, prompts)
                run = dict(variant=variant, steps=steps, guidance=g, **{k: acc[k] for k in SCORE_KEYS},
                           aligned_per_image=acc["aligned"], seconds_per_image=sec / len(prompts), **info)  # fmt: skip
                if feats_real is not None:
                    run["fd"] = frechet_distance(feats_real, scorer.features(images))
                results["runs"].append(run)
                print(
                    f"{variant:5s} steps {steps:2d} guidance {g:4.1f}: "
                    + " ".join(f"{k} {acc[k] * 100:5.1f}" for k in SCORE_KEYS)
                    + (f" | FD {run['fd']:.1f} (floor {fd_floor:.1f})" if feats_real is not None else "")
                    + f" | {sec / len(prompts) * 1000:.0f} ms/image",
                    flush=True,
                )
                if args.grid and not grid_done:
                    rows = [generate(pipe, data.DEMO_PROMPTS, steps, g, 1000 + r, 8, msl) for r in range(4)]
                    save_grid(torch.cat(rows), ncols=len(data.DEMO_PROMPTS), path=args.grid)
                    grid_done = True
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
