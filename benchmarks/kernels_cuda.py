"""GPU step time and memory of MixDQ plans (native weight backend) against compiled BF16, for a CUDA machine.

    python benchmarks/kernels_cuda.py                      # SD-2.1 UNet, latent 64 and 128, batch 2
    python benchmarks/kernels_cuda.py --config benchmarks/configs/sdxl-base-unet.json --latents 128

Not run yet (written on a machine without a GPU): without CUDA it prints a message and exits with status 0.
A real UNet config with random weights in bf16, every variant ``torch.compile``d (the same settings), one
denoising step of batch 2 timed with CUDA events (median of ``--reps`` after ``--warmup`` calls). Rows: BF16
(compiled), W8A8 (int8 weights and inputs: ``torch._int_mm``), W8A8 dynamic, FP8 (``torch._scaled_mm`` on
compute capability 8.9+), W4A16 and W8A16 (dequantize + bf16 GEMM). Memory: the model's tensors and the peak
allocated during a step. Targets (issue #15): W8A8 >= 1.3x faster than compiled BF16, W4A16 no slower, memory
<= 0.35x of BF16. Results go to ``benchmarks/results/kernels_cuda[_<name>].json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from _common import RESULTS, storage_bytes
from kernels_cpu import SD21, inputs

PLANS = {
    "W8A8 static": dict(weights="int8", activations="int8", act_range=8.0),
    "W8A8 dynamic": dict(weights="int8", activations="int8"),
    "FP8": dict(weights="float8", activations="float8", act_range=8.0),
    "W8A16": dict(weights="int8"),
    "W4A16": dict(weights="int4"),
}


def quantized(model, plan_kwargs: dict):
    import copy

    from diffusers_mixdq import BitPlan
    from diffusers_mixdq.apply import quantize_module

    variant = copy.deepcopy(model)
    for name, spec in BitPlan.uniform(**plan_kwargs).resolve(model, strict=False).layer_specs().items():
        if spec.is_quantized:
            variant.set_submodule(name, quantize_module(variant.get_submodule(name), spec, backend="native"))
    return variant


def timed(model, kwargs, warmup: int, reps: int) -> tuple[float, int]:
    with torch.no_grad():
        for _ in range(warmup):
            model(**kwargs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**kwargs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), torch.cuda.max_memory_allocated()


def run(config_path: Path, latents, warmup: int, reps: int) -> dict:
    from diffusers import UNet2DConditionModel

    config = json.loads(config_path.read_text())
    torch.manual_seed(0)
    base = UNet2DConditionModel.from_config(config).eval().to("cuda", torch.bfloat16)
    variants = {"BF16": base} | {name: quantized(base, kw) for name, kw in PLANS.items()}
    rows = []
    for latent in latents:
        kwargs = {k: v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.to("cuda")
                  for k, v in inputs(config, latent).items() if torch.is_tensor(v)}
        results = {}
        for name, model in variants.items():
            torch._dynamo.reset()
            try:
                results[name] = timed(torch.compile(model), kwargs, warmup, reps)
            except Exception as e:  # noqa: BLE001 - reported in the table
                results[name] = (float("nan"), 0)
                print(f"{name} at latent {latent}: {type(e).__name__}: {str(e)[:200]}")
        bf16_s, bf16_peak = results["BF16"]
        rows += [{"variant": name, "latent": latent, "median_s": s, "speedup_vs_bf16": bf16_s / s,
                  "weights_bytes": storage_bytes(variants[name]), "step_peak_bytes": peak,
                  "peak_vs_bf16": peak / bf16_peak if bf16_peak else None} for name, (s, peak) in results.items()]
    return {"config": config_path.name, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=SD21)
    parser.add_argument("--latents", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--name", default="")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_cuda.py: no CUDA device here; run it on a machine with an NVIDIA GPU.")
        return 0
    result = run(args.config, args.latents, args.warmup, args.reps)
    path = RESULTS / f"kernels_cuda{'_' + args.name if args.name else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("| variant | latent | step (ms) | speed-up vs BF16 | weights (MiB) | peak (MiB) | peak vs BF16 |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['variant']} | {r['latent']} | {r['median_s'] * 1e3:.1f} | {r['speedup_vs_bf16']:.2f}x | "
              f"{r['weights_bytes'] / 2**20:.0f} | {r['step_peak_bytes'] / 2**20:.0f} | "
              f"{(r['peak_vs_bf16'] or 0):.2f} |")
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
