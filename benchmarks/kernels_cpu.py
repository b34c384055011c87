"""CPU step time and memory of MixDQ plans with the quanto and the native weight backend, as ratios to FP32.

    OMP_NUM_THREADS=1 python benchmarks/kernels_cpu.py                 # SD-2.1 UNet, latent 64, batch 2
    OMP_NUM_THREADS=1 python benchmarks/kernels_cpu.py --latent 32 --config benchmarks/configs/sdxl-base-unet.json

A real UNet config with random weights, one denoising step (one UNet call, classifier-free-guidance batch 2).
Every variant lives in the same process (quantized copies share the FP32 model's unquantized tensors) and the
steps run round-robin, ``--reps`` rounds, so the machine's load hits every variant alike; the table gives each
variant's best step time over FP32's (on a shared machine a slow round is someone else's load; the medians are
in the JSON). Memory, per variant: the bytes the model's tensors hold (quantized weights as stored,
dequantize-once caches included) and the peak of the bytes held by tensors allocated during a step (activations,
dequantized weights), counted exactly from the allocation events of one extra, untimed step under
``torch.profiler`` (the RSS of a process holding every variant says little about one of them; its peak rise,
sampled every 5 ms, is in the JSON). Their sum is the peak a process holding only that variant reaches beyond
the model's other tensors. ``--threads`` sets torch's thread count (default: ``OMP_NUM_THREADS``).
Results go to ``benchmarks/results/kernels_cpu[_<name>].json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from _common import REPO, RESULTS, storage_bytes

SD21 = REPO.parent / "shared" / "model-configs" / "sd21-base-unet.json"
KINDS = ("W8A16", "W4A16", "W8A8", "W8A8-token", "W4A8")
#: backend ``native-sim``: the native model of the same plan with its CPU int8 GEMM off (A8 layers simulated)
BACKENDS = ("quanto", "native", "native-sim")
#: (row name, plan kind, backend)
VARIANTS = [("FP32", None, None)] + [(f"{kind} {backend}", kind, backend) for kind in KINDS for backend in BACKENDS
                                     if backend != "native-sim" or "A8" in kind]


def plan_of(kind: str):
    from diffusers_mixdq import BitPlan

    return {"W8A16": BitPlan.uniform("int8"), "W4A16": BitPlan.uniform("int4"),
            "W8A8": BitPlan.uniform("int8", activations="int8"),
            "W8A8-token": BitPlan.uniform("int8", activations="int8", act_range="dynamic-token"),
            "W4A8": BitPlan.uniform("int4", activations="int8")}[kind]


def _int8_gemm_for(backend: str | None) -> None:
    """The native backend's CPU int8 GEMM off for ``native-sim`` rows, at its default otherwise."""
    from diffusers_mixdq.apply.backends.native import real_gemm

    real_gemm.use_cpu_int8_gemm(False if backend == "native-sim" else None)


def quantized_copy(model, kind: str, backend: str, specs: dict | None = None):
    """``model`` with every planned layer replaced by a MixDQ module of ``backend`` (other tensors shared); ``specs``
    (layer name -> LayerSpec) instead of the plan of ``kind`` (benchmarks/act_token_cost.py)."""
    from diffusers_mixdq.apply import quantize_module
    from diffusers_mixdq.apply.memory import release_free_memory

    variant = copy.deepcopy(model, memo={id(t): t for t in list(model.parameters()) + list(model.buffers())})
    specs = plan_of(kind).resolve(model, strict=False).layer_specs() if specs is None else specs
    for i, (name, spec) in enumerate(specs.items()):
        if spec.is_quantized:
            variant.set_submodule(name, quantize_module(model.get_submodule(name), spec, backend=backend))
        if i % 32 == 31:  # the float copies quantized so far leave heap holes between the kept int8 data
            release_free_memory()
    release_free_memory()
    return variant


def inputs(config: dict, latent: int, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    kwargs = dict(sample=torch.randn(batch, config["in_channels"], latent, latent, generator=g),
                  timestep=torch.tensor([500] * batch),
                  encoder_hidden_states=torch.randn(batch, 77, config["cross_attention_dim"], generator=g))
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text embeddings and size conditioning
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, generator=g),
                                       "time_ids": torch.randn(batch, 6, generator=g)}
    return kwargs


def step(model, kwargs) -> tuple[float, int]:
    """Seconds of one UNet call and the peak RSS rise during it."""
    from diffusers_mixdq.apply.memory import PeakMemory, process_memory

    before = process_memory()["VmRSS"]
    with torch.no_grad(), PeakMemory() as peak:
        t = time.perf_counter()
        model(**kwargs)
        seconds = time.perf_counter() - t
    return seconds, max(0, peak.peak_rss - before)


def tensor_peak(model, kwargs) -> int:
    """Peak bytes held by the tensors allocated during one UNet call (from the profiler's allocation events)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(**kwargs)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def run(config_path: Path, latent: int, reps: int, kinds=("W8A16", "W4A16", "W8A8"),
        backends=("quanto", "native", "native-sim"), peaks_too: bool = True) -> dict:
    from diffusers import UNet2DConditionModel

    config = json.loads(config_path.read_text())
    torch.manual_seed(0)
    fp32 = UNet2DConditionModel.from_config(config).eval()
    chosen = [(name, kind, backend) for name, kind, backend in VARIANTS
              if kind is None or (kind in kinds and backend in backends)]
    models, backend_of = {}, {name: backend for name, _, backend in chosen}
    for name, kind, backend in chosen:  # native-sim shares the native model of its plan
        twin = f"{kind} native"
        models[name] = (fp32 if kind is None else models[twin] if backend == "native-sim" and twin in models
                        else quantized_copy(fp32, kind, "native" if backend == "native-sim" else backend))
    warm = inputs(config, 8)
    for name, model in models.items():  # first call: lazy allocations (oneDNN primitives)
        _int8_gemm_for(backend_of[name])
        step(model, warm)
    kwargs = inputs(config, latent)
    peaks = {}
    for name, model in models.items() if peaks_too else ():
        _int8_gemm_for(backend_of[name])
        peaks[name] = tensor_peak(model, kwargs)
    times = {name: [] for name in models}
    rises = {name: 0 for name in models}
    for _ in range(reps):
        for name, model in models.items():
            _int8_gemm_for(backend_of[name])
            seconds, rise = step(model, kwargs)
            times[name].append(seconds)
            rises[name] = max(rises[name], rise)
    fp = min(times["FP32"])
    rows = [{"variant": name, "best_s": min(ts), "ratio_vs_fp32": min(ts) / fp, "median_s": statistics.median(ts),
             "times_s": ts, "weights_bytes": storage_bytes(models[name]), "step_tensor_peak_bytes": peaks.get(name, 0),
             "step_peak_rss_rise_bytes": rises[name]} for name, ts in times.items()]
    for row in rows:  # what a process running only this variant would peak at, beyond the rest of the model
        row["peak_bytes"] = row["weights_bytes"] + row["step_tensor_peak_bytes"]
    return {"config": config_path.name, "latent": latent, "batch": 2, "reps": reps,
            "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "cpu_int8_instructions": _cpu_int8_instructions(),
            "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
            "rows": rows}


def _cpu_int8_instructions() -> bool:
    from diffusers_mixdq.apply.backends.native import real_gemm

    return real_gemm.cpu_has_int8_instructions()


def table(result: dict) -> str:
    lines = [f"{result['config']}, latent {result['latent']}, batch 2, {result['threads']} thread(s), "
             f"best of {result['reps']} round-robin steps",
             "", "| variant | step (s) | ratio vs FP32 | weights (MiB) | step tensor peak (MiB) "
             "| weights + step peak (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['best_s']:.2f} | {r['ratio_vs_fp32']:.2f}x | "
                     f"{r['weights_bytes'] / 2**20:.0f} | {r['step_tensor_peak_bytes'] / 2**20:.0f} | "
                     f"{r['peak_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=SD21)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--kinds", default="W8A16,W4A16,W8A8",
                        help=f"plans to run beside FP32 (comma-separated, of {','.join(KINDS)})")
    parser.add_argument("--backends", default="quanto,native,native-sim",
                        help="weight backends to run (comma-separated; native-sim: native with its CPU int8 GEMM off)")
    parser.add_argument("--threads", type=int, help="torch threads (default: OMP_NUM_THREADS, else every core)")
    parser.add_argument("--name", default="", help="suffix of the results file")
    parser.add_argument("--no-peaks", action="store_true", help="skip the profiled step (memory peaks read 0)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif os.environ.get("OMP_NUM_THREADS") is None:
        print("note: OMP_NUM_THREADS is not set; this uses every core (set it to pin the thread count)")
    result = run(args.config, args.latent, args.reps, tuple(args.kinds.split(",")),
                 tuple(args.backends.split(",")), peaks_too=not args.no_peaks)
    path = RESULTS / f"kernels_cpu{'_' + args.name if args.name else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
