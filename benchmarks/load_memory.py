"""Checkpoint size and peak load memory of MixDQ plans on a real-size UNet (SD-2.1-base / SD-Turbo, random weights).

    python benchmarks/load_memory.py                # writes benchmarks/results/load_memory.json and .md

Steps (each load runs in its own fresh process, so peaks do not leak between measurements):

1. Build the UNet from ``../shared/model-configs/sd21-base-unet.json`` with random weights and save it once as an
   FP16 safetensors checkpoint (cached in ``benchmarks/_work``).
2. Quantize it with an all-int8 and an all-int4 plan while loading, and save both pre-quantized checkpoints.
3. Measure, each in a new process: plain FP16 ``from_pretrained``; MixDQ int8 / int4 quantize-on-load from the FP16
   checkpoint; loads of the pre-quantized int8 / int4 checkpoints.

Memory is read through psutil (``apply.memory.process_memory``) by a sampling thread (every 5 ms) during
``from_pretrained`` followed by a pass that touches every page of every tensor (a memory-mapped checkpoint is otherwise read lazily, so a plain
FP16 load looks free until the first forward): peak RSS (``VmHWM``) and peak anonymous RSS (``RssAnon``: what the
process allocated itself, without the file-backed pages of the memory-mapped checkpoint). Both are reported in
total and above the process's baseline after imports; "resident" is the RSS once loading is over.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from diffusers_mixdq.apply.memory import PeakMemory, process_memory

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIG = REPO.parent / "shared" / "model-configs" / "sd21-base-unet.json"
WORK = HERE / "_work"
RESULTS = HERE / "results"


def measure(mode: str, path: str) -> dict:
    """Run inside a fresh process: one from_pretrained, its peaks and time."""
    import torch
    from diffusers import UNet2DConditionModel

    import diffusers_mixdq

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    kwargs = {"torch_dtype": torch.float16}
    if mode in ("mixdq-int8", "mixdq-int4"):
        plan = diffusers_mixdq.BitPlan.uniform(mode.split("-")[1])
        kwargs["quantization_config"] = diffusers_mixdq.MixDQConfig(plan=plan)
    base = process_memory()
    t0 = time.perf_counter()
    with PeakMemory() as peak:
        model = UNet2DConditionModel.from_pretrained(path, **kwargs)
        seconds = time.perf_counter() - t0
        # a memory-mapped checkpoint is read lazily: touch every page of every tensor, as a first forward would
        with torch.no_grad():
            for t in model.state_dict().values():
                t.flatten()[::256].float().sum()
    after = process_memory()
    del model
    return {
        "mode": mode,
        "load_seconds": seconds,
        "baseline_rss": base["VmRSS"],
        "baseline_anon": base["RssAnon"],
        "peak_rss": peak.peak_rss,
        "peak_anon": peak.peak_anon,
        "resident_rss": after["VmRSS"],
        "resident_anon": after["RssAnon"],
        "resident_file": after["RssFile"],
    }


def _in_fresh_process(mode: str, path: Path) -> dict:
    cmd = [sys.executable, __file__, "--measure", mode, "--path", str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def prepare() -> dict[str, Path]:
    import torch
    from diffusers import UNet2DConditionModel

    import diffusers_mixdq

    fp16 = WORK / "sd21-unet-fp16"
    if not (fp16 / "diffusion_pytorch_model.safetensors").is_file():
        print("building the SD-2.1-base UNet with random weights ...", flush=True)
        config = json.loads(CONFIG.read_text())
        torch.manual_seed(0)
        model = UNet2DConditionModel.from_config(config).half()
        model.save_pretrained(fp16)
        del model
    paths = {"fp16": fp16}
    for bits in ("int8", "int4"):
        out = WORK / f"sd21-unet-{bits}"
        if not (out / "config.json").is_file():
            print(f"quantizing to {bits} and saving ...", flush=True)
            plan = diffusers_mixdq.BitPlan.uniform(bits)
            model = UNet2DConditionModel.from_pretrained(
                fp16, torch_dtype=torch.float16, quantization_config=diffusers_mixdq.MixDQConfig(plan=plan)
            )
            model.save_pretrained(out)
            del model
        paths[bits] = out
    return paths


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "load_memory.json"))
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.path)))
        return

    paths = prepare()
    sizes = {k: checkpoint_bytes(p) for k, p in paths.items()}
    runs = [
        ("fp16", paths["fp16"]),
        ("mixdq-int8", paths["fp16"]),
        ("mixdq-int4", paths["fp16"]),
        ("prequantized-int8", paths["int8"]),
        ("prequantized-int4", paths["int4"]),
    ]
    loads = {}
    for mode, path in runs:
        print(f"measuring {mode} ...", flush=True)
        loads[mode] = _in_fresh_process(mode, path)
    fp = loads["fp16"]

    def ratio(mode, key, above_baseline=False):
        a, b = loads[mode][key], fp[key]
        if above_baseline:
            base = "baseline_anon" if "anon" in key else "baseline_rss"
            a, b = a - loads[mode][base], b - fp[base]
        return a / b

    result = {
        "model": "SD-2.1-base UNet (random weights), from " + CONFIG.name,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "checkpoint_bytes": sizes,
        "size_ratio_fp16_over": {k: sizes["fp16"] / sizes[k] for k in ("int8", "int4")},
        "loads": loads,
        "peak_ratio_vs_fp16": {
            mode: {
                "rss_total": ratio(mode, "peak_rss"),
                "rss_above_baseline": ratio(mode, "peak_rss", True),
                # FP16 weights are file-backed (mmap), so compare our allocations with FP16's whole footprint
                "anon_vs_fp16_rss": loads[mode]["peak_anon"] / fp["peak_rss"],
                "anon_vs_fp16_rss_above_baseline": (loads[mode]["peak_anon"] - loads[mode]["baseline_anon"])
                / (fp["peak_rss"] - fp["baseline_rss"]),
                "resident_total": ratio(mode, "resident_rss"),
            }
            for mode in loads
            if mode != "fp16"
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "| load | time (s) | peak RSS (GB) | peak anon (GB) | resident RSS (GB) | peak RSS vs FP16 "
        "| peak anon vs FP16 peak RSS | resident RSS vs FP16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    gb = 1024**3
    for mode, m in loads.items():
        r = result["peak_ratio_vs_fp16"].get(mode)
        cells = ["1.00", "1.00", "1.00"] if r is None else [
            f"{r['rss_total']:.2f}", f"{r['anon_vs_fp16_rss']:.2f}", f"{r['resident_total']:.2f}"
        ]
        md.append(
            f"| {mode} | {m['load_seconds']:.1f} | {m['peak_rss'] / gb:.2f} | {m['peak_anon'] / gb:.2f} | "
            f"{m['resident_rss'] / gb:.2f} | " + " | ".join(cells) + " |"
        )
    md += [
        "",
        "| checkpoint | bytes | FP16 / this |",
        "|---|---|---|",
    ]
    for k, v in sizes.items():
        md.append(f"| {k} | {v:,} | {sizes['fp16'] / v:.2f}x |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
