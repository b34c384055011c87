"""CPU step time of per-token activations (``act_range: "dynamic-token"``) against static per-tensor ranges: the
same plans, the quanto and the native weight backend, as ratios measured side by side in one process (issue #14:
may per-token be the builder's default?).

    OMP_NUM_THREADS=1 python benchmarks/act_token_cost.py --model sd21 --latent 32 --reps 3
    OMP_NUM_THREADS=1 python benchmarks/act_token_cost.py --model shapes --reps 7

``sd21``: the SD-2.1-base UNet config with random weights, one UNet call of batch 2 (as ``kernels_cpu.py``),
uniform W8A8 and W4A8 plans whose inputs have a static range (absmax 4.0 everywhere: the value changes no work)
against the same plans with a run-time range per token. ``shapes``: the bundled demo UNet with its bundled ``w8a8``
and ``w4a8-mixed`` plans (calibrated static ranges) against the same layer specs with ``"dynamic-token"``, one UNet
call of batch 64 (the eval's 32 prompts with classifier-free guidance), latent 8x8, 16 text tokens. Both sides drop
BOS-aware rows and timestep groups, so the activation scheme is the only difference. Steps run round-robin,
``--reps`` rounds; a variant's time is its best step (on a shared machine a slow round is someone else's load).
Results: ``benchmarks/results/act_token_cost_<model>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics

import torch

from _common import RESULTS
from kernels_cpu import SD21, inputs, quantized_copy, step


def variant_specs(plan, model, token: bool) -> dict:
    """The plan's quantized layer specs on ``model``, with a run-time range per token (``token``) or as planned."""
    specs = {}
    for name, spec in plan.resolve(model, strict=False).layer_specs().items():
        if spec.is_quantized:
            quantized_input = spec.activations != "none"
            act_range = "dynamic-token" if token and quantized_input else spec.act_range
            specs[name] = dataclasses.replace(spec, act_range=act_range, act_groups=None, flags={})
    return specs


def setup(model_name: str, latent: int):
    """(FP32 denoiser, {plan name: BitPlan}, call inputs, warm-up inputs) of a benchmark model."""
    from diffusers_mixdq import BitPlan

    if model_name == "sd21":
        from diffusers import UNet2DConditionModel

        config = json.loads(SD21.read_text())
        torch.manual_seed(0)
        model = UNet2DConditionModel.from_config(config).eval()
        plans = {f"W{w[-1]}A8": BitPlan.uniform(w, activations="int8", act_range=4.0) for w in ("int8", "int4")}
        return model, plans, inputs(config, latent), inputs(config, 8)
    from diffusers_mixdq import demo

    model = demo.load_pipeline().unet.eval()
    plans = {name: BitPlan.load(f"{demo.plans_dir('shapes')}/{name}") for name in ("w8a8", "w4a8-mixed")}
    kwargs = inputs(dict(model.config), model.config.sample_size, batch=64)
    kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"][:, :16]
    return model, plans, kwargs, kwargs


def run(model_name: str, latent: int, reps: int, backends: tuple[str, ...]) -> dict:
    model, plans, kwargs, warm = setup(model_name, latent)
    models = {"FP32": model}
    for plan_name, plan in plans.items():
        for token in (False, True):
            specs = variant_specs(plan, model, token)
            for backend in backends:
                name = f"{plan_name} {'token' if token else 'static'} {backend}"
                models[name] = quantized_copy(model, plan_name, backend, specs=specs)
    for m in models.values():
        step(m, warm)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(reps):
        for name, m in models.items():
            times[name].append(step(m, kwargs)[0])
    best = {name: min(ts) for name, ts in times.items()}
    rows = []
    for plan_name in plans:
        for backend in backends:
            static, token = best[f"{plan_name} static {backend}"], best[f"{plan_name} token {backend}"]
            rows.append({"plan": plan_name, "backend": backend, "static_s": static, "token_s": token,
                         "token_over_static": token / static, "static_over_fp32": static / best["FP32"],
                         "token_over_fp32": token / best["FP32"]})
    return {"model": model_name, "latent": latent if model_name == "sd21" else model.config.sample_size,
            "batch": kwargs["sample"].shape[0], "reps": reps, "threads": torch.get_num_threads(),
            "fp32_s": best["FP32"], "machine": {"processor": platform.processor() or platform.machine(),
                                                "torch": torch.__version__},
            "rows": rows, "times_s": times, "medians_s": {n: statistics.median(ts) for n, ts in times.items()}}


def table(result: dict) -> str:
    lines = [f"{result['model']}, latent {result['latent']}, batch {result['batch']}, {result['threads']} thread(s), "
             f"best of {result['reps']} round-robin steps; FP32 {result['fp32_s']:.3f} s", "",
             "| plan | backend | static (s) | per-token (s) | per-token / static | static / FP32 | per-token / FP32 |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['plan']} | {r['backend']} | {r['static_s']:.3f} | {r['token_s']:.3f} | "
                     f"**{r['token_over_static']:.2f}x** | {r['static_over_fp32']:.2f}x | {r['token_over_fp32']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("sd21", "shapes"), default="sd21")
    parser.add_argument("--latent", type=int, default=32, help="sd21 only (shapes: its own 8x8)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--backends", default="quanto,native", help="weight backends (comma-separated)")
    args = parser.parse_args(argv)
    result = run(args.model, args.latent, args.reps, tuple(args.backends.split(",")))
    print(table(result))
    path = RESULTS / f"act_token_cost_{args.model}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {path} (rename it to keep it: the next run of this model writes the same file)")


if __name__ == "__main__":
    main()
