"""CPU latency of W8A8 linear layers: diffusers-mixdq's path vs optimum-quanto's int8 x int8 path vs FP32.

    python benchmarks/act_quant_cpu.py        # prints a table, writes benchmarks/results/act_quant_cpu.json

diffusers-mixdq rounds the layer input to the int8 grid (static per-tensor scale) in floating point and runs the
weight-quantized matmul; quanto's own W8A8 path (QLinear with activations=qint8) calls torch._int_mm. Both give
the same quantized values; this measures the time of each, side by side in one run, on SD-like shapes.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from optimum.quanto import QLinear, qint8

from diffusers_mixdq import LayerSpec
from diffusers_mixdq.apply import quantize_module

SHAPES = [(4096, 320, 320), (1024, 640, 2560), (256, 1280, 1280)]  # (tokens, in, out)


def median_time(fn, repeats=7):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main():
    torch.manual_seed(0)
    rows = []
    for tokens, fin, fout in SHAPES:
        lin = torch.nn.Linear(fin, fout)
        x = torch.randn(tokens, fin)
        absmax = float(x.abs().max())
        ours = quantize_module(lin, LayerSpec("int8", "int8", absmax))
        theirs = QLinear.from_module(lin, weights=qint8, activations=qint8)
        theirs.input_scale = torch.tensor(absmax / 127)
        theirs.freeze()
        theirs.disable_output_quantization()
        with torch.no_grad():
            t_fp = median_time(lambda: lin(x))
            t_ours = median_time(lambda: ours(x))
            t_quanto = median_time(lambda: theirs(x))
            a, b = ours(x), theirs(x)
            b = b.dequantize() if hasattr(b, "dequantize") else b
            rel = float((a - b).norm() / a.norm())
        rows.append({"tokens": tokens, "in": fin, "out": fout, "fp32_ms": t_fp * 1e3, "mixdq_ms": t_ours * 1e3,
                     "quanto_int8_ms": t_quanto * 1e3, "relative_difference": rel})
    out = {"machine": {"processor": platform.processor(), "threads": torch.get_num_threads()}, "rows": rows}
    path = Path(__file__).parent / "results" / "act_quant_cpu.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print("| tokens x in x out | FP32 (ms) | mixdq W8A8 (ms) | quanto W8A8 (ms) | quanto / mixdq | rel. diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']}x{r['in']}x{r['out']} | {r['fp32_ms']:.2f} | {r['mixdq_ms']:.2f} | "
              f"{r['quanto_int8_ms']:.2f} | {r['quanto_int8_ms'] / r['mixdq_ms']:.1f}x | {r['relative_difference']:.1e} |")


if __name__ == "__main__":
    main()
