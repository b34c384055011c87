"""What the builder's cheaper sensitivity sweep costs and what it gives, against the naive protocol.

    python benchmarks/builder_cost.py            # demo model (W4A8 mixed, as examples/build_demo_plans.py builds it)
    python benchmarks/builder_cost.py --tiny     # also the tiny random pipeline of the tests: time per phase

For the bundled demo model it builds the same W4A8 mixed plan twice, once with the naive protocol (every layer x
width measured on every recorded sample and a full pipeline run over every prompt per content layer:
``sweep_fraction=1, content_fraction=1, extrapolate_widest=False``) and once with the defaults (``--variants``
picks others), then evaluates the plans on the same 32
held-out prompts and seeds (PSNR / SSIM vs full precision, alignment accuracy of the bundled scorer). Writes
``benchmarks/results/builder_cost.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffusers_mixdq import demo
from diffusers_mixdq.builder import BuildSettings, build_plan

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


NAIVE = {"sweep_fraction": 1.0, "content_fraction": 1.0, "extrapolate_widest": False}


def parse_variant(text: str) -> dict:
    """``"default"``, ``"naive"`` or ``"key=value,key=value"`` (BuildSettings fields) -> settings overrides."""
    if text == "default":
        return {}
    if text == "naive":
        return dict(NAIVE)
    out = {}
    for item in text.split(","):
        key, value = item.split("=")
        out[key] = bool(int(value)) if key == "extrapolate_widest" else float(value)
    return out


def demo_builds(variants: list[str], eval_n: int) -> list[dict]:
    from diffusers_mixdq.demo.scorer import scorer_with_real_features
    from diffusers_mixdq.evaluate import evaluate

    torch.manual_seed(0)
    pipe = demo.load_pipeline()
    prompts = demo.eval_prompts(16, seed=1234)[:8]  # the calibration prompts of examples/build_demo_plans.py
    rows, plans = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(variants):
            settings = BuildSettings(prompts=prompts, steps=demo.NUM_INFERENCE_STEPS, guidance=demo.GUIDANCE_SCALE,
                                     height=32, width=32, seed=1000, weight_bits=4.0, **parse_variant(variant))
            t0 = time.perf_counter()
            plan, report = build_plan(pipe, settings)
            seconds = time.perf_counter() - t0
            name = variant
            plans[name] = str(plan.save(Path(tmp) / f"v{i}").parent)
            rows.append({"variant": name, "build_seconds": seconds, "seconds": report.seconds,
                         "denoiser_calls": report.denoiser_evaluations,
                         "sample_evaluations": report.sample_evaluations,
                         "naive_sample_evaluations": report.naive_sample_evaluations,
                         "reduction": report.reduction, "avg_weight_bits": plan.summary().avg_weight_bits,
                         "chosen_k": report.chosen_k,
                         "weights": {w: n for w, n in plan.summary().weight_layers.items()}})
        eval_prompts = demo.eval_prompts(eval_n)
        scorer, real = scorer_with_real_features(eval_prompts)
        results = evaluate(demo.pipeline_path(), plans, eval_prompts, steps=demo.NUM_INFERENCE_STEPS,
                           guidance=demo.GUIDANCE_SCALE, scorer=scorer, real_features=real, measure_memory=False)
    by_name = {r.name: r for r in results}
    for row in rows:
        r = by_name[row["variant"]]
        row.update(psnr=r.psnr, ssim=r.ssim, aligned=r.alignment["all"] if r.alignment else None, frechet=r.frechet)
    fp = by_name["FP32"]
    rows.append({"variant": "FP32", "aligned": fp.alignment["all"] if fp.alignment else None, "frechet": fp.frechet})
    return rows


def tiny_build() -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_pipeline

    pipe = make_pipeline()
    pipe.set_progress_bar_config(disable=True)
    settings = BuildSettings(prompts=["a red circle", "a blue square", "a green star", "a tiny dot"], steps=2,
                             guidance=3.0, height=32, width=32, weight_bits=4.0,
                             protected=("conv_in", "conv_out"))
    t0 = time.perf_counter()
    _, report = build_plan(pipe, settings, progress=False)
    return {"total_seconds": time.perf_counter() - t0, "seconds": report.seconds,
            "sample_evaluations": report.sample_evaluations,
            "naive_sample_evaluations": report.naive_sample_evaluations, "reduction": report.reduction}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="also time the phases on the tests' tiny pipeline")
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=["naive", "default"],
                        help="builds to compare: naive, default, or key=value,... BuildSettings overrides")
    args = parser.parse_args()
    out: dict = {"torch_threads": torch.get_num_threads()}
    if args.tiny:
        out["tiny"] = tiny_build()
        print(json.dumps(out["tiny"], indent=1))
    out["demo"] = demo_builds(args.variants, args.eval_prompts)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "builder_cost.json").write_text(json.dumps(out, indent=1))
    print("| build | sample-evals (ours) | naive | fewer | build s | PSNR dB | SSIM | aligned | Fréchet |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in out["demo"]:
        if r["variant"] == "FP32":
            print(f"| FP32 | | | | | | | {r['aligned']:.3f} | {r['frechet']:.2f} |")
            continue
        ours = sum(r["sample_evaluations"].values())
        print(f"| {r['variant']} | {ours:,} | {r['naive_sample_evaluations']:,} | {r['reduction']:.2f}x | "
              f"{r['build_seconds']:.0f} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['aligned']:.3f} | "
              f"{r['frechet']:.2f} |")


if __name__ == "__main__":
    main()
