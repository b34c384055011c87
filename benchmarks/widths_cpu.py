"""CPU cost of the int3 / int5 / int6 weights of the native backend against int4 / int2: one layer's
dequantization (the eager workspace path every call takes) and the whole weight-only Linear call, each width timed
round-robin in one process and reported as a ratio to int4.

    OMP_NUM_THREADS=1 python benchmarks/widths_cpu.py [--out benchmarks/results/widths_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from diffusers_mixdq import LayerSpec
from diffusers_mixdq.apply import quantize_module
from diffusers_mixdq.apply.backends.native import kernels

WIDTHS = ("int2", "int3", "int4", "int5", "int6", "int8")


def _time(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-features", type=int, default=1280)
    parser.add_argument("--out-features", type=int, default=5120)
    parser.add_argument("--rows", type=int, default=1024, help="rows of the Linear call (tokens x batch)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/widths_cpu.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    layer = torch.nn.Linear(args.in_features, args.out_features)
    x = torch.randn(args.rows, args.in_features)
    modules = {w: quantize_module(layer, LayerSpec(w), backend="native") for w in WIDTHS}
    times = {w: {"dequantize": [], "linear": []} for w in WIDTHS}
    with torch.no_grad():
        for _ in range(args.rounds):  # round-robin: the machine's load hits every width alike
            for w, m in modules.items():
                times[w]["dequantize"].append(_time(lambda m=m: kernels.weight(m, x), args.repeats))
                times[w]["linear"].append(_time(lambda m=m: m(x), args.repeats))
    median = {w: {k: statistics.median(v) for k, v in t.items()} for w, t in times.items()}
    result = {"shape": [args.out_features, args.in_features], "rows": args.rows, "threads": torch.get_num_threads(),
              "seconds": median,
              "ratio_to_int4": {w: {k: v / median["int4"][k] for k, v in t.items()} for w, t in median.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("| weights | dequantize ms | vs int4 | linear call ms | vs int4 |\n|---|---|---|---|---|")
    for w, t in median.items():
        r = result["ratio_to_int4"][w]
        print(f"| {w} | {1e3 * t['dequantize']:.2f} | {r['dequantize']:.2f}x | {1e3 * t['linear']:.2f} | "
              f"{r['linear']:.2f}x |")


if __name__ == "__main__":
    main()
