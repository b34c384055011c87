"""Why ``torch.compile`` (inductor) output of A8 plans differs from eager: the fake quantization alone, each
whole model, and (``--trace``) where the first difference appears, on the tests' tiny UNet (native backend).

    OMP_NUM_THREADS=1 python benchmarks/compile_numerics.py            # ~10 min on a loaded 2-core machine
    OMP_NUM_THREADS=1 python benchmarks/compile_numerics.py --trace    # + each layer's input / output
    OMP_NUM_THREADS=1 python benchmarks/compile_numerics.py --model shapes --prompts 8   # a bundled trained model

``--model`` (``shapes`` / ``scenes``) runs the bundled trained pipeline instead, with each of its bundled plans on
the native backend: its denoiser compiled (``fullgraph=True``; a recompilation is an error) against eager, the same
prompts and seeds, the relative MSE of the first denoiser call's output and of the final images, and the images'
PSNR compiled against eager (``compile_numerics_<model>.json``).

1. ``fake_quantize`` compiled alone on the recorded input of every A8 layer (static and dynamic scales): how many
   codes differ from eager. 2. relative MSE of the compiled model against eager, per plan. 3. ``--trace``: the
   relative MSE of every quantized layer's input and output, compiled against eager, in call order.
Results go to ``benchmarks/results/compile_numerics.json``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from _common import REPO, RESULTS

sys.path.insert(0, str(REPO / "tests"))
from conftest import make_unet, unet_inputs  # noqa: E402  (the tests' tiny UNet)

PLANS = {"fp32": None, "w8a16": dict(weights="int8"),
         "w8a8-static": dict(weights="int8", activations="int8", act_range=4.0),
         "w8a8-dynamic": dict(weights="int8", activations="int8", act_range="dynamic")}


def quantized(plan: str):
    from diffusers_mixdq import BitPlan
    from diffusers_mixdq.apply import quantize_module

    model = make_unet()
    if PLANS[plan] is not None:
        for name, spec in BitPlan.uniform(**PLANS[plan]).resolve(model, strict=False).layer_specs().items():
            if spec.is_quantized:
                model.set_submodule(name, quantize_module(model.get_submodule(name), spec, backend="native"))
    return model


def rel_mse(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).pow(2).mean() / ref.double().pow(2).mean().clamp_min(1e-300)).item()


def recorded(model) -> tuple[list, list]:
    """Calls the model (eager) with hooks that record every quantized layer's (name, input, output)."""
    calls: list = []
    handles = [m.register_forward_hook(lambda m, a, o, n=n: calls.append((n, a[0], o)))
               for n, m in model.named_modules() if hasattr(m, "mixdq_spec")]
    return calls, handles


def run_model(model, compiled: bool) -> torch.Tensor:
    x, t, e = unet_inputs()
    fn = torch.compile(model, fullgraph=True) if compiled else model
    with torch.no_grad():
        return fn(sample=x, timestep=t, encoder_hidden_states=e).sample


def fake_quant_flips() -> dict:
    from diffusers_mixdq.apply.activations import fake_quantize

    model = quantized("w8a8-static")
    calls, _ = recorded(model)
    run_model(model, False)
    static = torch.compile(lambda x, s: fake_quantize(x, "int8", s), dynamic=True, fullgraph=True)
    dynamic = torch.compile(lambda x: fake_quantize(x, "int8", x.abs().amax() / 127.0), dynamic=True,
                            fullgraph=True)
    flips = {"static": 0, "dynamic": 0, "values": 0}
    for _, x, _ in calls:
        scale = torch.tensor(4.0 / 127)
        flips["static"] += (fake_quantize(x, "int8", scale) != static(x, scale)).sum().item()
        flips["dynamic"] += (fake_quantize(x, "int8", x.abs().amax() / 127.0) != dynamic(x)).sum().item()
        flips["values"] += x.numel()
    return flips


def trace(plan: str) -> list[dict]:
    model = quantized(plan)
    calls, _ = recorded(model)
    run_model(model, False)
    eager = list(calls)
    calls.clear()
    run_model(model, True)  # the hooks are traced into the compiled graph and record its tensors
    return [{"layer": n, "input_rel_mse": rel_mse(xb, xa), "output_rel_mse": rel_mse(yb, ya)}
            for (n, xa, ya), (_, xb, yb) in zip(eager, calls)]


def _sample(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def trained(model: str, prompts: int) -> dict:
    """Compiled against eager on the bundled trained ``model``, each bundled denoiser plan (see the docstring)."""
    from diffusers_mixdq import use_weight_backend
    from diffusers_mixdq.demo import plans_in, prompt_set
    from diffusers_mixdq.demo.models import get_model
    from diffusers_mixdq.evaluation.generation import denoiser_name, generate, load_pipeline

    demo = get_model(model)
    gen = demo.generation_settings()
    texts = prompt_set(model, "test", prompts, seed=1)
    out = {}
    for name, path in [("fp32", None)] + [(n, p) for n, p in plans_in(demo.plans_dir()).items() if "te" not in n]:
        torch._dynamo.reset()
        with use_weight_backend("native"):
            pipe = load_pipeline(demo.pipeline_path(), path)
        denoiser = getattr(pipe, denoiser_name(pipe))
        first: list = []  # the first denoiser call's inputs
        hook = denoiser.register_forward_pre_hook(lambda m, a, k: first.append((a, k)) if not first else None,
                                                  with_kwargs=True)
        eager, _ = generate(pipe, texts, 0, **gen)
        hook.remove()
        fast = torch.compile(denoiser, fullgraph=True)
        setattr(pipe, denoiser_name(pipe), fast)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled, _ = generate(pipe, texts, 0, **gen)  # every denoising step: no recompilation
        with torch.inference_mode():
            a, k = first[0]
            call = rel_mse(_sample(fast(*a, **k)), _sample(denoiser(*a, **k)))
        mse = (compiled.double() - eager.double()).pow(2).flatten(1).mean(1)
        out[name] = {"first_call_rel_mse": call,
                     "image_rel_mse": rel_mse(compiled, eager),
                     "psnr_min_db": float(10 * torch.log10(1 / mse.max().clamp_min(1e-20))),
                     "identical_images": int((mse == 0).sum())}
        print(f"{model} {name}: {out[name]}", flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", action="store_true", help="also trace every layer of the W8A8 dynamic plan")
    parser.add_argument("--model", help="a bundled trained model (shapes, scenes) instead of the tiny UNet")
    parser.add_argument("--prompts", type=int, default=8, help="test prompts for --model (seeds 0..N-1)")
    args = parser.parse_args(argv)
    if args.model:
        path = RESULTS / f"compile_numerics_{args.model}.json"
        path.write_text(json.dumps(trained(args.model, args.prompts), indent=2) + "\n")
        print(f"\nwritten {path}")
        return
    result = {"fake_quantize_flips": fake_quant_flips(), "model_rel_mse": {}}
    print("fake_quantize compiled alone, codes differing from eager:", result["fake_quantize_flips"], flush=True)
    for plan in PLANS:
        torch._dynamo.reset()
        model = quantized(plan)
        result["model_rel_mse"][plan] = rel_mse(run_model(model, True), run_model(model, False))
        print(f"{plan}: compiled vs eager relative MSE {result['model_rel_mse'][plan]:.2e}", flush=True)
    if args.trace:
        torch._dynamo.reset()
        result["trace_w8a8_dynamic"] = trace("w8a8-dynamic")
        for row in result["trace_w8a8_dynamic"]:
            print(f"{row['layer']}: input {row['input_rel_mse']:.1e} output {row['output_rel_mse']:.1e}")
    path = RESULTS / "compile_numerics.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
