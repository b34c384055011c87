"""Quality of MixDQ plans and of the peers on the bundled demo model: PSNR / SSIM vs FP32, alignment, Fréchet.

    python benchmarks/peers_quality.py                      # writes benchmarks/results/peers_quality.json

Every variant (see ``_common.VARIANTS``) generates the same prompts (``demo.prompt_set("shapes", "test", N,
seed)``, the held-out test set ``mixdq eval`` uses) with the same seeds (prompt ``i``: seed ``seed + i``), steps and
guidance (the demo model's defaults), each in its own fresh process (no variant's imports, kernels or allocations
affect another). The images come back to this process, which scores them all the way ``mixdq eval`` does
(``evaluation.score_variant`` and ``evaluation.summary``): per-image PSNR to the FP32 images (median, 10th
percentile, images below ``evaluation.DIVERGED_DB`` = 20 dB counted as diverged: another scene, not noise), SSIM,
text alignment with the bundled scorer (every attribute right) with a 95% bootstrap interval, and the Fréchet
distance of the scorer's features to those of the rendered ground-truth scenes. The PSNR pooled over all images
(one MSE, which a single diverged image dominates) is kept in the JSON as ``psnr``.

Size is the denoiser's bytes as held in memory (quantized weights packed, scales included). Generation runs under
``torch.no_grad()`` for every variant: quanto's int4 layers fail under ``torch.inference_mode()``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BY_NAME, RESULTS, VARIANTS, error_line, format_exception  # noqa: E402


def generate(pipe, prompts, seed: int, steps: int, guidance: float, batch_size: int):
    """``evaluate.generate_timed`` under ``no_grad`` for every variant (quanto's int4 layers fail in inference
    mode): images and the seconds of each batch."""
    from diffusers_mixdq.evaluation import generate_timed

    return generate_timed(pipe, prompts, seed, steps, guidance, batch_size, inference_mode=False)


def load_demo_pipeline(variant):
    """The demo pipeline with its UNet loaded as ``variant``."""
    from diffusers import DiffusionPipeline
    from diffusers.quantizers import PipelineQuantizationConfig

    from _common import demo_plan, peer_config, torch_dtype
    from diffusers_mixdq import demo
    from diffusers_mixdq.evaluation import load_pipeline

    if variant.family == "MixDQ":  # the library's own loading path (checks the BOS state too)
        return load_pipeline(demo.pipeline_path(), demo_plan(variant))
    kwargs = {"dtype": torch_dtype(variant.dtype)}
    if variant.peer is not None:
        kwargs["quantization_config"] = PipelineQuantizationConfig(quant_mapping={"unet": peer_config(variant.peer)})
    pipe = DiffusionPipeline.from_pretrained(demo.pipeline_path(), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure(name: str, args_json: str) -> dict:
    """In a fresh process: load the variant, generate, save the images; sizes and times."""
    import torch

    from _common import quiet, storage_bytes
    from diffusers_mixdq.sampling import seconds_per_image

    quiet()
    args = json.loads(args_json)
    torch.set_num_threads(args["threads"])
    variant = BY_NAME[name]
    t0 = time.perf_counter()
    pipe = load_demo_pipeline(variant)
    load_seconds = time.perf_counter() - t0
    images, times = generate(pipe, args["prompts"], args["seed"], args["steps"], args["guidance"], args["batch_size"])
    torch.save(images, args["images"])
    timed = times[1:] or times
    avg_bits = None
    cfg = getattr(pipe.unet.config, "quantization_config", None)
    if variant.family == "MixDQ" and cfg is not None:
        avg_bits = cfg.plan.summary().avg_weight_bits
    return {
        "denoiser_bytes": storage_bytes(pipe.unet),
        "denoiser_bytes_16": storage_bytes(pipe.unet, float_bytes=2),
        "denoiser_dtype": str(pipe.unet.dtype).replace("torch.", ""),
        "avg_weight_bits": avg_bits,
        "load_seconds": load_seconds,
        "seconds_per_batch": sorted(timed)[len(timed) // 2],
        "seconds_per_image": seconds_per_image(times, len(args["prompts"]), args["batch_size"]),
        "loadavg": os.getloadavg(),
    }


def run_variant(name: str, args: dict) -> dict:
    """Measure one variant in its own process; ``{"error": ...}`` when it fails."""
    cmd = [sys.executable, __file__, "--measure", name, "--args", json.dumps(args)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return {"error": "process failed", "detail": (result.stderr or result.stdout)[-3000:]}
    return json.loads(lines[-1])


def score_row(row: dict, images, reference, prompts, scorer, real_features):
    """Add ``mixdq eval``'s metrics of ``images`` (against ``reference``'s images; None: these are the reference)
    to ``row``; the reference result."""
    from diffusers_mixdq.evaluation import VariantResult, score_variant, summary

    res = VariantResult(name=row["name"], denoiser_bytes=row["denoiser_bytes"],
                        seconds_per_image=row["seconds_per_image"], images=images)
    score_variant(res, reference, prompts, scorer, real_features)
    s = summary(res)
    row.update(psnr=res.psnr, ssim=res.ssim, psnr_median=s["psnr_median_db"], psnr_p10=s["psnr_p10_db"],
               diverged=s["diverged"], psnr_per_image=res.psnr_per_image, alignment=res.alignment,
               aligned=s["aligned"], aligned_ci=s["aligned_ci"], frechet=res.frechet)
    return reference or res


def run(num_prompts: int = 128, seed: int = 0, batch_size: int = 32, threads: int | None = None,
        variants: list[str] | None = None, progress: bool = True) -> dict:
    import torch
    from tqdm.auto import tqdm

    from diffusers_mixdq import demo
    from diffusers_mixdq.demo.scorer import scorer_with_real_features

    names = variants or [v.name for v in VARIANTS]
    if names[0] != "FP32":
        names = ["FP32"] + [n for n in names if n != "FP32"]
    prompts = demo.prompt_set("shapes", "test", num_prompts, seed)
    scorer, real_features = scorer_with_real_features(prompts)
    settings = {"prompts": prompts, "seed": seed, "steps": demo.NUM_INFERENCE_STEPS,
                "guidance": demo.GUIDANCE_SCALE, "batch_size": batch_size, "threads": threads or os.cpu_count() or 1}
    rows, reference = [], None
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in tqdm(names, desc="demo variants", disable=not progress):
            images_path = Path(tmp) / f"{len(rows)}.pt"
            t0 = time.perf_counter()
            row = {"name": name, "family": BY_NAME[name].family, "weight_bits": BY_NAME[name].weight_bits,
                   **run_variant(name, {**settings, "images": str(images_path)})}
            row["wall_seconds"] = time.perf_counter() - t0
            if "error" not in row:
                reference = score_row(row, torch.load(images_path), reference, prompts, scorer, real_features)
            elif name == "FP32":
                raise RuntimeError(f"the FP32 reference failed:\n{row['detail']}")
            rows.append(row)
    return {
        "model": "bundled demo model (diffusers_mixdq/demo/pipeline), UNet quantized",
        "settings": {k: v for k, v in settings.items() if k != "prompts"} | {"num_prompts": num_prompts,
                                                                             "height": 32, "width": 32},
        "seconds": time.perf_counter() - t_start,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: all CPUs)")
    parser.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS], metavar="NAME",
                        help="variants to run (default: all; FP32 always runs first, as the reference)")
    parser.add_argument("--out", default=str(RESULTS / "peers_quality.json"))
    args = parser.parse_args()
    if args.measure:
        try:
            print(json.dumps(measure(args.measure, args.args)))
        except Exception as e:  # noqa: BLE001 - the parent records it
            print(format_exception(e), file=sys.stderr)
            print(json.dumps({"error": error_line(e), "detail": format_exception(e)}))
        return
    result = run(args.num_prompts, args.seed, args.batch_size, args.threads, args.variants)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
