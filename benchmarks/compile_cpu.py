"""CPU step time of native-backend plans eager against ``torch.compile`` (inductor), as ratios in one run.

    OMP_NUM_THREADS=1 python benchmarks/compile_cpu.py                       # SD-2.1 UNet, latent 32, batch 2
    OMP_NUM_THREADS=1 python benchmarks/compile_cpu.py --layers-per-block 1  # a mid-size UNet (faster compiles)

A real UNet config with random weights (``--layers-per-block`` overrides its depth), one denoising step of batch
2. For FP32 and each plan (W8A16, W4A16, W8A8 with dynamic per-tensor inputs; native weight backend) the eager
model and ``torch.compile(model, fullgraph=True)`` run round-robin, ``--reps`` rounds after a warm-up call (the
compilation, timed apart); the table gives each best step time, compiled / eager, and the relative MSE of the
compiled output against eager. Results go to ``benchmarks/results/compile_cpu[_<name>].json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from _common import RESULTS
from kernels_cpu import SD21, inputs, quantized_copy


def _call(model, kwargs) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        t = time.perf_counter()
        out = model(**kwargs, return_dict=False)[0]
        return time.perf_counter() - t, out


def run(config: dict, latent: int, reps: int, kinds) -> dict:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    fp32 = UNet2DConditionModel.from_config(config).eval()
    models = {"FP32": fp32} | {kind: quantized_copy(fp32, kind, "native") for kind in kinds}
    kwargs = inputs(config, latent)
    compiled, compile_s, rel_mse = {}, {}, {}
    for name, model in models.items():
        torch._dynamo.reset()
        compiled[name] = torch.compile(model, fullgraph=True)
        compile_s[name], out = _call(compiled[name], kwargs)
        ref = _call(model, kwargs)[1].double()
        rel_mse[name] = ((out.double() - ref).pow(2).mean() / ref.pow(2).mean()).item()
        print(f"{name}: first compiled call {compile_s[name]:.0f} s, rel. MSE vs eager {rel_mse[name]:.1e}", flush=True)
    times = {(name, mode): [] for name in models for mode in ("eager", "compiled")}
    for _ in range(reps):
        for name in models:
            times[(name, "eager")].append(_call(models[name], kwargs)[0])
            times[(name, "compiled")].append(_call(compiled[name], kwargs)[0])
    rows = [{"variant": name, "eager_s": min(times[(name, "eager")]), "compiled_s": min(times[(name, "compiled")]),
             "compiled_vs_eager": min(times[(name, "compiled")]) / min(times[(name, "eager")]),
             "first_call_s": compile_s[name], "rel_mse_vs_eager": rel_mse[name],
             "times_s": {m: times[(name, m)] for m in ("eager", "compiled")}} for name in models]
    return {"latent": latent, "batch": 2, "reps": reps, "threads": torch.get_num_threads(),
            "layers_per_block": config["layers_per_block"], "torch": torch.__version__, "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=SD21)
    parser.add_argument("--layers-per-block", type=int, help="override the config's depth")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--kinds", default="W8A16,W4A16,W8A8", help="plans beside FP32 (comma-separated)")
    parser.add_argument("--name", default="")
    args = parser.parse_args(argv)
    config = json.loads(args.config.read_text())
    if args.layers_per_block:
        config["layers_per_block"] = args.layers_per_block
    result = run(config, args.latent, args.reps, args.kinds.split(","))
    result["config"] = args.config.name
    path = RESULTS / f"compile_cpu{'_' + args.name if args.name else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.config.name} (layers_per_block {config['layers_per_block']}), latent {args.latent}, batch 2, "
          f"{result['threads']} thread(s), best of {args.reps}\n")
    print("| variant | eager (s) | compiled (s) | compiled / eager | first call (s) | rel. MSE vs eager |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['variant']} | {r['eager_s']:.2f} | {r['compiled_s']:.2f} | {r['compiled_vs_eager']:.2f}x | "
              f"{r['first_call_s']:.0f} | {r['rel_mse_vs_eager']:.1e} |")
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
