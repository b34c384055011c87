"""A/B of the native backend's scaled-output path (``native.kernels.SCALED_OUTPUT_MIN_BYTES``): one UNet step of
FP32 and of one W8A16 model with the path on and off (switched by the threshold), round-robin in one process.

    OMP_NUM_THREADS=2 python benchmarks/scaled_output_ab.py --threads 2 --reps 3   # SDXL UNet, latent 64, batch 2
"""

from __future__ import annotations

import argparse
import json

import torch

import kernels_cpu as kc
from _common import REPO, RESULTS

SDXL = REPO / "benchmarks" / "configs" / "sdxl-base-unet.json"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(SDXL))
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    from diffusers import UNet2DConditionModel

    from diffusers_mixdq.apply.backends.native import kernels

    torch.set_num_threads(args.threads)
    config = json.loads(open(args.config).read())
    torch.manual_seed(0)
    fp32 = UNet2DConditionModel.from_config(config).eval()
    w8 = kc.quantized_copy(fp32, "W8A16", "native")
    for model in (fp32, w8):
        kc.step(model, kc.inputs(config, 8))
    kwargs = kc.inputs(config, args.latent)
    on, off = kernels.SCALED_OUTPUT_MIN_BYTES, 2**62
    with torch.no_grad():
        scaled = w8(**kwargs).sample
        kernels.SCALED_OUTPUT_MIN_BYTES = off
        before = w8(**kwargs).sample
    times = {"FP32": [], "W8A16 scaled output": [], "W8A16 weight scaled": []}
    for _ in range(args.reps):
        for name in times:
            kernels.SCALED_OUTPUT_MIN_BYTES = on if name == "W8A16 scaled output" else off
            times[name].append(kc.step(fp32 if name == "FP32" else w8, kwargs)[0])
        print({k: [round(t, 2) for t in v] for k, v in times.items()}, flush=True)
    kernels.SCALED_OUTPUT_MIN_BYTES = on
    best = min(times["FP32"])
    result = {"config": str(args.config), "latent": args.latent, "threads": args.threads, "times_s": times,
              "ratio_vs_fp32": {k: min(v) / best for k, v in times.items()},
              "rel_err_scaled_vs_weight_scaled": float((scaled - before).norm() / before.norm())}
    print(json.dumps(result["ratio_vs_fp32"]), "rel err", result["rel_err_scaled_vs_weight_scaled"])
    path = RESULTS / f"scaled_output_ab_latent{args.latent}_t{args.threads}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {path}")


if __name__ == "__main__":
    main()
