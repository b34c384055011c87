"""Disk size, peak memory and step latency of MixDQ plans and of the peers on real-size UNets (random weights).

    python benchmarks/peers_size.py                         # writes benchmarks/results/peers_size.json
    python benchmarks/peers_size.py --device cuda           # GPU rows (FP16 reference; written, not run here)

Architectures: the SD-2.1-base UNet (``../shared/model-configs/sd21-base-unet.json``, 866M parameters) and an
SDXL-size UNet (``configs/sdxl-base-unet.json``, written from SDXL's published UNet config numbers, 2.57B
parameters), both with random weights, saved once as FP32 checkpoints in ``benchmarks/_work``.

Every (architecture, variant) runs in its own fresh process, which

1. loads the UNet from the FP32 checkpoint with the variant's dtype or quantization config (quantize-on-load for
   the quantized variants), reads one element per page of every tensor it holds (safetensors maps the file
   lazily: a plain FP32 load is otherwise not resident until the first step), and records the peak RSS of both
   (a sampling thread, ``apply.memory.PeakMemory``);
2. runs the UNet on one latent (``--latent`` x ``--latent``, batch ``--batch``, 77 text tokens; SDXL also gets its
   pooled text embedding and time ids) ``--warmup`` times, then ``--repeats`` times, timing each call: the
   median is the step latency. The kernel's peak-RSS mark is reset before this phase, so its peak is the
   memory of the loaded model during a step. On a CPU, FP16 runs a single step on the architectures of
   ``--half-step-archs`` and none on the others (CPUs without FP16 matmul kernels take minutes per step);
3. saves the model with ``save_pretrained`` (the size on disk; the FP32 row is the checkpoint itself).

MixDQ plans on these UNets: random weights have no sensitivity to measure, so the mixed plans' widths come from
the library's allocator (``build.allocate.solve_groups``) with the same candidate widths, the same budget and the
same content/quality split as the demo model's built plan of that name, and a data-free stand-in score (weight
quantization error, proportional to parameters x 2^(-2 bits)). Activations are quantized to int8 with a static
range (the compute of a calibrated plan; the range's value does not change the cost). Size, memory and latency
depend on the widths only, not on which layers carry them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BY_NAME,
    HERE,
    REPO,
    RESULTS,
    VARIANTS,
    WORK,
    dir_bytes,
    error_line,
    format_exception,
    machine,
)

ARCHS = {
    "sd21": {"label": "SD-2.1-base UNet", "config": REPO.parent / "shared" / "model-configs" / "sd21-base-unet.json"},
    "sdxl": {"label": "SDXL-size UNet", "config": HERE / "configs" / "sdxl-base-unet.json"},
}
#: static activation range of the real-size MixDQ plans (any positive value costs the same)
ACT_RANGE = 4.0


def checkpoint_dir(arch: str) -> Path:
    return WORK / f"{arch}-unet-fp32"


def prepare(arch: str) -> Path:
    """The FP32 checkpoint of ``arch`` with random weights (seed 0), built once."""
    import torch
    from diffusers import UNet2DConditionModel

    out = checkpoint_dir(arch)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    print(f"building the {ARCHS[arch]['label']} with random weights (FP32) in {out} ...", flush=True)
    config = json.loads(Path(ARCHS[arch]["config"]).read_text())
    torch.manual_seed(0)
    model = UNet2DConditionModel.from_config(config)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    del model
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def skeleton(arch: str):
    """The architecture on the meta device (no memory), for plans."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config(json.loads(Path(ARCHS[arch]["config"]).read_text()))


def layer_group(name: str, content_patterns=None) -> str:
    """MixDQ's group of a UNet layer: ``content`` (the UNet family's content patterns, or ``content_patterns``)
    or ``quality``."""
    from diffusers_mixdq.families import ModelFamily, family_of

    unet = family_of("UNet2DConditionModel")
    family = unet if content_patterns is None else ModelFamily("benchmark", content=tuple(content_patterns))
    return "content" if family.role(name, "content") else "quality"


def group_widths(plan) -> tuple[dict[str, float], dict[str, list[int]]]:
    """A resolved plan's average weight width per group (content / quality, parameter-weighted) and the widths
    its build could choose from (its provenance, else the widths it uses)."""
    settings = (plan.provenance or {}).get("settings", {})
    patterns = settings.get("content_patterns")
    manifest = plan.manifest()
    bits: dict[str, float] = {}
    size: dict[str, float] = {}
    used: dict[str, set[int]] = {}
    for name, spec in plan.layer_specs().items():
        g = layer_group(name, patterns)
        n = manifest[name].numel
        b = spec.weight_bits or 16
        bits[g] = bits.get(g, 0.0) + b * n
        size[g] = size.get(g, 0.0) + n
        used.setdefault(g, set()).add(b)
    widths = settings.get("widths") or {g: sorted(u) for g, u in used.items()}
    return {g: bits[g] / size[g] for g in bits}, {g: [int(w) for w in ws] for g, ws in widths.items()}


def realsize_plan(arch: str, name: str, activations: bool = True):
    """The MixDQ plan ``name`` (see the module docstring) for ``arch``, and a one-line description."""
    from _common import demo_plan_dir
    from diffusers_mixdq import BitPlan
    from diffusers_mixdq.builder import AllocationProblem, LayerChoice, solve_groups
    from diffusers_mixdq.plan import layer_table

    act = {"activations": "int8", "act_range": ACT_RANGE} if activations else {"activations": "none"}
    uniform = {"w8a8": "int8", "w4a8-uniform": "int4"}
    if name in uniform:
        return BitPlan(defaults={"weights": uniform[name], **act}), f"uniform {uniform[name]}"
    demo = BitPlan.load(demo_plan_dir(name))
    ratios, widths = group_widths(demo)
    budget = float(demo.provenance["settings"]["weight_bits"])
    table = layer_table(skeleton(arch))
    groups = {n: layer_group(n) for n in table}
    layers = [LayerChoice(n, info.numel, groups[n], {b: -info.numel * 4.0 ** -b for b in widths[groups[n]]})
              for n, info in table.items()]
    problem = AllocationProblem(layers, budget_bits=budget, mode="at_most", tolerance=0.02)
    allocation = solve_groups(problem, {g: ratios[g] for g in problem.groups})
    bits_to_dtype = {8: "int8", 4: "int4", 2: "int2"}
    plan = BitPlan(layers={n: {"weights": bits_to_dtype[int(allocation.choice[n])], **act} for n in table})
    return plan, allocation.summary()


def make_inputs(config: dict, latent: int, batch: int, dtype, device):
    import torch

    g = torch.Generator().manual_seed(0)
    kwargs = {
        "sample": torch.randn(batch, config["in_channels"], latent, latent, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 77, config["cross_attention_dim"], generator=g),
    }
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        side = latent * 8
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * batch, dtype=torch.float32),
        }

    def cast(x):
        if isinstance(x, dict):
            return {k: cast(v) for k, v in x.items()}
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)

    return {k: cast(v) for k, v in kwargs.items()}


def measure(arch: str, name: str, args: dict) -> dict:
    """In a fresh process: load, step, save; memory, latency and sizes."""
    import torch
    from diffusers import UNet2DConditionModel

    from _common import load_kwargs, quiet, reset_peak_rss, saved_bytes, storage_bytes, torch_dtype, touch
    from diffusers_mixdq.apply.memory import PeakMemory, process_memory

    quiet()
    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    cuda = device.type == "cuda"
    variant = BY_NAME[name]
    dtype = variant.dtype if variant.family == "FP" else args["compute_dtype"]
    plan, plan_info = None, None
    if variant.family == "MixDQ":
        plan, plan_info = realsize_plan(arch, variant.plan, activations=not variant.weights_only)
    kwargs = load_kwargs(variant, plan)
    kwargs["torch_dtype"] = torch_dtype(dtype)
    ckpt = checkpoint_dir(arch)
    base = process_memory()
    reset_peak_rss()
    t0 = time.perf_counter()
    with PeakMemory() as load_peak:
        model = UNet2DConditionModel.from_pretrained(ckpt, **kwargs)
        touch(model)  # a memory-mapped checkpoint is read lazily: make every weight resident
        if cuda:
            model.to(device)
    load_seconds = time.perf_counter() - t0
    loaded = process_memory()

    config = json.loads(Path(ARCHS[arch]["config"]).read_text())
    inputs = make_inputs(config, args["latent"], args["batch"], torch_dtype(dtype), device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    times, out = [], None
    with PeakMemory() as step_peak, torch.no_grad():
        for _ in range(args["warmup"] + args["repeats"]):
            t = time.perf_counter()
            out = model(**inputs).sample
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    timed = sorted(times[args["warmup"]:])
    stepped = bool(timed)
    result = {
        "dtype": dtype,
        "plan": plan_info,
        "load_seconds": load_seconds,
        "baseline_rss": base["VmRSS"],
        "load_peak_rss": load_peak.peak_rss,
        "load_peak_anon": load_peak.peak_anon,
        "resident_rss": loaded["VmRSS"],
        "step_peak_rss": step_peak.peak_rss if stepped else None,
        "step_peak_anon": step_peak.peak_anon if stepped else None,
        "step_seconds": timed[len(timed) // 2] if stepped else None,
        "step_times": times,
        "warmup": args["warmup"],
        "output_finite": bool(torch.isfinite(out.float()).all()) if stepped else None,
        "storage_bytes": storage_bytes(model),
        "storage_bytes_16": storage_bytes(model, float_bytes=2),
        "loadavg": os.getloadavg(),
    }
    if cuda:
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    if variant.name == "FP32" and not cuda:
        result["disk_bytes"] = dir_bytes(ckpt)
    else:
        result["disk_bytes"], result["disk_error"] = saved_bytes(model, WORK / f"save-{arch}-{os.getpid()}")
    return result


def run_variant(arch: str, name: str, args: dict) -> dict:
    cmd = [sys.executable, __file__, "--measure", f"{arch}:{name}", "--args", json.dumps(args)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = (result.stderr or result.stdout)[-3000:]
        return {"error": f"process failed (exit {result.returncode})", "detail": tail}
    return json.loads(lines[-1])


def default_variants(device: str) -> list[str]:
    if device == "cuda":
        return ["FP16", "MixDQ W8A8"]
    return [v.name for v in VARIANTS if v.real_size]


def steps_for(arch: str, name: str, args: dict, half_step_archs: list[str]) -> dict:
    """Warm-up and timed steps of one run: 16-bit float variants on a CPU run a single step (no warm-up) on the
    architectures in ``half_step_archs`` and none elsewhere: CPUs without native FP16 / BF16 matmuls run them
    tens of times slower than FP32 (the step's latency and memory are then left out)."""
    if args["device"] == "cpu" and BY_NAME[name].dtype in ("float16", "bfloat16"):
        return {"warmup": 0, "repeats": 1 if arch in half_step_archs else 0}
    return {}


def run(archs: list[str], variants: list[str] | None = None, device: str = "cpu", latent: int = 32,
        batch: int = 1, warmup: int = 1, repeats: int = 3, threads: int | None = None,
        compute_dtype: str | None = None, half_step_archs: list[str] = ("sd21",), progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    names = variants or default_variants(device)
    reference = names[0]
    args = {"device": device, "latent": latent, "batch": batch, "warmup": warmup, "repeats": repeats,
            "threads": threads or os.cpu_count() or 1,
            "compute_dtype": compute_dtype or ("float16" if device == "cuda" else "float32")}
    t_start = time.perf_counter()
    out = {"device": device, "settings": {**args, "half_step_archs": list(half_step_archs)},
           "reference": reference, "archs": {}}
    jobs = [(a, n) for a in archs for n in names]
    bar = tqdm(jobs, desc="real-size variants", disable=not progress)
    for arch in archs:
        t0 = time.perf_counter()
        ckpt = prepare(arch)
        rows = []
        for name in names:
            bar.set_postfix_str(f"{arch}: {name}")
            t1 = time.perf_counter()
            run_args = {**args, **steps_for(arch, name, args, list(half_step_archs))}
            row = {"name": name, "family": BY_NAME[name].family, **run_variant(arch, name, run_args)}
            row["wall_seconds"] = time.perf_counter() - t1
            rows.append(row)
            bar.update(1)
        out["archs"][arch] = {"label": ARCHS[arch]["label"], "config": str(ARCHS[arch]["config"]),
                              "checkpoint_bytes": dir_bytes(ckpt), "rows": rows,
                              "seconds": time.perf_counter() - t0}
    bar.close()
    out["seconds"] = time.perf_counter() - t_start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    parser.add_argument("--archs", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    parser.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS], metavar="NAME",
                        help="variants (default: every real-size variant on cpu; FP16 and MixDQ W8A8 on cuda); "
                        "the first is the reference of the ratios")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--latent", type=int, default=32, help="latent height and width (default 32: 256 px)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: all CPUs)")
    parser.add_argument("--compute-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="dtype of the quantized variants (default: float32 on cpu, float16 on cuda)")
    parser.add_argument("--half-step-archs", nargs="*", choices=list(ARCHS), default=["sd21"],
                        help="on cpu, FP16 / BF16 rows run one step only on these (default: sd21) and none on "
                        "the others")
    parser.add_argument("--out", default=None, help="default: results/peers_size.json (peers_size_cuda.json)")
    args = parser.parse_args()
    if args.measure:
        arch, name = args.measure.split(":", 1)
        try:
            print(json.dumps(measure(arch, name, json.loads(args.args))))
        except Exception as e:  # noqa: BLE001 - the parent records it
            print(format_exception(e), file=sys.stderr)
            print(json.dumps({"error": error_line(e), "detail": format_exception(e)}))
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device on this machine")
    result = run(args.archs, args.variants, args.device, args.latent, args.batch, args.warmup, args.repeats,
                 args.threads, args.compute_dtype, args.half_step_archs)
    result["machine"] = machine()
    if args.device == "cuda":
        import torch

        result["machine"]["gpu"] = torch.cuda.get_device_name(0)
    default = "peers_size_cuda.json" if args.device == "cuda" else "peers_size.json"
    out = Path(args.out or RESULTS / default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
