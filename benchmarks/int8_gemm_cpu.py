"""One W8A8 Linear on the CPU: FP32 vs the native backend's simulated path vs its int8 GEMM (``torch._int_mm``).

    OMP_NUM_THREADS=1 python benchmarks/int8_gemm_cpu.py
    OMP_NUM_THREADS=2 python benchmarks/int8_gemm_cpu.py --threads 2 --name t2

Shapes (rows x in x out) of SDXL's and SD-2.1's UNet layers at latent 64, batch 2, and of the bundled demo UNet.
Each layer: int8 weights, dynamic per-tensor int8 inputs (the input's absolute maximum and quantization included
in the time), the three variants round-robin, median of ``--reps`` calls. Results go to
``benchmarks/results/int8_gemm_cpu[_<name>].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from _common import RESULTS

SHAPES = [(512, 1280, 1280), (512, 1280, 10240), (512, 5120, 1280), (154, 2048, 1280),  # SDXL, 1280 channels
          (8192, 320, 320), (8192, 320, 2560), (8192, 1280, 320), (2048, 640, 640),  # SD-2.1, 320 / 640
          (128, 128, 512), (128, 64, 64)]  # the demo UNet


def measure(rows: int, k: int, n: int, reps: int) -> dict:
    from diffusers_mixdq import LayerSpec
    from diffusers_mixdq.apply import quantize_module
    from diffusers_mixdq.apply.backends.native import real_gemm

    torch.manual_seed(0)
    linear, x = torch.nn.Linear(k, n), torch.randn(rows, k)
    module = quantize_module(linear, LayerSpec("int8", "int8", "dynamic"), backend="native")
    variants = {"fp32": (linear, None), "simulated": (module, False), "int8_gemm": (module, True)}
    times = {name: [] for name in variants}
    with torch.no_grad():
        for _ in range(reps + 1):  # the first round warms up (oneDNN primitives)
            for name, (layer, int8) in variants.items():
                if int8 is not None:
                    real_gemm.use_cpu_int8_gemm(int8)
                t = time.perf_counter()
                layer(x)
                times[name].append(time.perf_counter() - t)
    real_gemm.use_cpu_int8_gemm(None)
    med = {name: statistics.median(ts[1:]) for name, ts in times.items()}
    return {"shape": [rows, k, n], "median_ms": {k2: v * 1e3 for k2, v in med.items()},
            "simulated_vs_fp32": med["simulated"] / med["fp32"], "int8_gemm_vs_fp32": med["int8_gemm"] / med["fp32"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch threads (default: OMP_NUM_THREADS, else every core)")
    parser.add_argument("--name", default="", help="suffix of the results file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers_mixdq.apply.backends.native import real_gemm

    rows = [measure(*shape, args.reps) for shape in SHAPES]
    print(f"{torch.get_num_threads()} thread(s), VNNI / AMX: {real_gemm.cpu_has_int8_instructions()}, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| rows x in x out | FP32 (ms) | simulated (ms) | int8 GEMM (ms) | int8 GEMM / FP32 |\n|---|---|---|---|---|")
    for r in rows:
        m = r["median_ms"]
        print(f"| {' x '.join(map(str, r['shape']))} | {m['fp32']:.2f} | {m['simulated']:.2f} | "
              f"{m['int8_gemm']:.2f} | {r['int8_gemm_vs_fp32']:.2f}x |")
    result = {"threads": torch.get_num_threads(), "load_average": os.getloadavg(), "torch": torch.__version__,
              "cpu_int8_instructions": real_gemm.cpu_has_int8_instructions(), "rows": rows}
    path = RESULTS / f"int8_gemm_cpu{'_' + args.name if args.name else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
