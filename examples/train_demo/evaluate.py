"""Measure the demo pipeline's text alignment (and a Fréchet distance) with the scorer.

For each (steps, guidance) setting, generates one image per prompt of
``eval_prompts(n, seed)`` (seeded per batch), reports the scorer's accuracy
on colour / shape / position / size / all, and the Fréchet distance between
scorer features of the generations and of freshly rendered real images
(with the real-vs-real distance of two independent renders as a floor).
Optionally writes a PNG grid of the demo prompts.

Examples::

    # the numbers in the model card (default steps/guidance from defaults.json)
    python examples/train_demo/evaluate.py --n 240 --json build/train_demo/eval.json \
        --grid diffusers_mixdq/demo/pipeline/samples.png

    # sweep to choose the defaults
    python examples/train_demo/evaluate.py --steps 4 6 8 --guidance 1 2 3 4 6
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

from diffusers_mixdq import demo  # noqa: E402
from diffusers_mixdq.demo import data  # noqa: E402
from diffusers_mixdq.demo.scorer import frechet_distance, load_scorer  # noqa: E402


@torch.no_grad()
def generate(pipe, prompts, steps: int, guidance: float, seed: int, batch_size: int = 16) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1]; batch ``i`` uses ``torch.Generator().manual_seed(seed + i)``."""
    out = []
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        gen = torch.Generator().manual_seed(seed + i)
        res = pipe(
            prompts[start : start + batch_size],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
            output_type="pt",
        )
        out.append(res.images.float().cpu())
    return torch.cat(out)


def save_grid(images: torch.Tensor, ncols: int, path: str, upscale: int = 4) -> None:
    """Save images (N, 3, H, W) in [0, 1] as a PNG grid (nearest-neighbour upscaled, 2 px gaps)."""
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
    p.add_argument("--pipeline", default=demo.pipeline_path())
    p.add_argument("--scorer", default=demo.scorer_path())
    p.add_argument("--n", type=int, default=240, help="number of prompts (>= 64)")
    p.add_argument("--prompt-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="generation seed")
    p.add_argument("--steps", type=int, nargs="+", default=[demo.NUM_INFERENCE_STEPS])
    p.add_argument("--guidance", type=float, nargs="+", default=[demo.GUIDANCE_SCALE])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--grid", default=None, help="write a PNG grid of DEMO_PROMPTS x 4 seeds here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.pipeline, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    scorer = load_scorer(args.scorer)
    prompts = demo.eval_prompts(args.n, seed=args.prompt_seed)

    real_a = data.render_batch(data.sample_scenes(args.n, seed=10_000))
    real_b = data.render_batch(data.sample_scenes(args.n, seed=20_000))
    feats_real = scorer.features(torch.from_numpy(real_a))
    fd_floor = frechet_distance(feats_real, scorer.features(torch.from_numpy(real_b)))
    real_scenes = data.sample_scenes(args.n, seed=10_000)
    real_acc = scorer.score(torch.from_numpy(real_a), [s.caption for s in real_scenes])
    print(f"real images: accuracy {real_acc}  FD(real, real') = {fd_floor:.3f}")

    results = dict(n=args.n, prompt_seed=args.prompt_seed, seed=args.seed, real_accuracy=real_acc,
                   fd_real_vs_real=fd_floor, runs=[])  # fmt: skip
    for steps in args.steps:
        for g in args.guidance:
            t0 = time.time()
            images = generate(pipe, prompts, steps, g, args.seed, args.batch_size)
            sec = time.time() - t0
            acc = scorer.score(images, prompts)
            fd = frechet_distance(feats_real, scorer.features(images))
            run = dict(steps=steps, guidance=g, **acc, fd=fd, seconds_per_image=sec / len(prompts))
            results["runs"].append(run)
            print(
                f"steps {steps:2d} guidance {g:4.1f}: colour {acc['colour']:.3f} shape {acc['shape']:.3f} "
                f"position {acc['position']:.3f} size {acc['size']:.3f} all {acc['all']:.3f} | FD {fd:.3f} "
                f"| {sec / len(prompts) * 1000:.0f} ms/image",
                flush=True,
            )

    if args.grid:
        steps, g = args.steps[0], args.guidance[0]
        rows = [generate(pipe, demo.DEMO_PROMPTS, steps, g, seed=1000 + r, batch_size=8) for r in range(4)]
        save_grid(torch.cat(rows), ncols=len(demo.DEMO_PROMPTS), path=args.grid)
        print(f"wrote {args.grid} (columns: DEMO_PROMPTS; rows: seeds 1000..1003; steps {steps}, guidance {g})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
