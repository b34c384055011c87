"""MixDQ against its peers, in one run: quality on the demo model, size / memory / latency on real-size UNets.

    python benchmarks/peers.py                  # both parts, then the report (see BENCHMARKS.md for timings)
    python benchmarks/peers.py --report-only    # re-render the report from benchmarks/results/peers_*.json

Runs ``peers_quality.py`` (PSNR / SSIM vs FP32, alignment, Fréchet distance on the bundled demo model) and
``peers_size.py`` (disk size, peak RSS at load and during a step, step latency on the SD-2.1-base and an
SDXL-size UNet with random weights), writes ``benchmarks/results/peers_quality.json``, ``peers_size.json``,
``peers_pareto.png`` and ``peers.md`` (the tables), and puts the tables into ``BENCHMARKS.md`` between its
``<!-- peers:begin -->`` / ``<!-- peers:end -->`` markers (text outside them is left alone).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, RESULTS, machine  # noqa: E402

BENCHMARKS_MD = REPO / "BENCHMARKS.md"
BEGIN, END = "<!-- peers:begin -->", "<!-- peers:end -->"
COLOURS = {"FP": "black", "MixDQ": "tab:red", "quanto": "tab:blue", "torchao": "tab:green", "SDNQ": "tab:purple"}


def _f(x, fmt: str, missing: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return format(x, fmt)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def aligned_cell(r: dict, n: int) -> str:
    """Alignment in percent with its 95% bootstrap interval (older results: ± its standard error)."""
    if r.get("aligned_ci") is not None:
        return f"{r['aligned']:.1f} [{r['aligned_ci'][0]:.1f}, {r['aligned_ci'][1]:.1f}]"
    a = r["alignment"]["all"]
    return f"{a * 100:.1f} ± {math.sqrt(max(a * (1 - a), 1e-12) / n) * 100:.1f}"


def quality_table(q: dict) -> list[str]:
    rows = q["rows"]
    fp = rows[0]
    params = fp["denoiser_bytes"] / 4  # FP32: every tensor of the state dict in 4 bytes
    n = q["settings"]["num_prompts"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["name"], "failed: " + r["error"].replace("|", "/")] + [""] * 12)
            continue
        nominal = r["avg_weight_bits"] if r.get("avg_weight_bits") is not None else r["weight_bits"]
        body.append([
            r["name"],
            f"{nominal:.2f}" if r["family"] == "MixDQ"
            else f"{nominal:g}" + ("" if r["family"] == "FP" else " (Linear)"),
            _f(r["denoiser_bytes"] * 8 / params, ".2f"),
            _f(r["denoiser_bytes"] / 1e6, ".2f"),
            _f(fp["denoiser_bytes"] / r["denoiser_bytes"], ".2f") + "x",
            _f(r["denoiser_bytes_16"] / 1e6, ".2f"),
            _f(r["psnr"], ".2f"),
            _f(r.get("psnr_median"), ".2f"),
            _f(r.get("psnr_p10"), ".2f"),
            _f(r.get("diverged"), "d"),
            _f(r["ssim"], ".4f"),
            aligned_cell(r, n),
            _f(r["frechet"], ".1f"),
            _f(r.get("seconds_per_image", r["seconds_per_batch"] / q["settings"]["batch_size"]), ".3f"),
        ])
    header = ["variant", "W bits (nominal)", "stored bits / param", "UNet MB", "FP32 / this", "MB, floats in 16 bit",
              "PSNR dB (pooled)", "PSNR dB (median image)", "PSNR dB (10th pct image)", "diverged images (< 20 dB)",
              "SSIM", "aligned % [95% CI]", "Fréchet", "s / image"]
    return _table(header, body)


def size_table(arch: dict, reference: str) -> list[str]:
    rows = arch["rows"]
    ref = next((r for r in rows if r["name"] == reference and "error" not in r), None)
    gb = 1e9

    def ratio(r, key, inverse=False):
        if ref is None or r.get(key) is None or not ref.get(key):
            return "-"
        v = ref[key] / r[key] if inverse else r[key] / ref[key]
        return f"{v:.2f}x"

    def mem(r, key):
        if r.get(key) is None:
            return "not run"
        return f"{r[key] / gb:.2f} ({r[key.replace('rss', 'anon')] / gb:.2f})"

    body = []
    for r in rows:
        if "error" in r:
            body.append([r["name"], "failed: " + r["error"].replace("|", "/")] + [""] * 8)
            continue
        disk = r.get("disk_bytes")
        steps = len(r["step_times"]) - r.get("warmup", 0)
        body.append([
            r["name"],
            "save failed" if disk is None else f"{disk / gb:.2f}",
            ratio(r, "disk_bytes", inverse=True),
            f"{r['storage_bytes_16'] / gb:.2f}",
            mem(r, "load_peak_rss"),
            ratio(r, "load_peak_rss"),
            mem(r, "step_peak_rss"),
            ratio(r, "step_peak_rss"),
            "not run" if r["step_seconds"] is None else f"{r['step_seconds']:.2f}" + ("" if steps > 1 else " (1 step)"),
            ratio(r, "step_seconds"),
        ])
    header = ["variant", "disk GB", f"{reference} / this", "GB, floats in 16 bit", "peak RSS load GB (anon)",
              "vs FP", "peak RSS step GB (anon)", "vs FP", "s / step", "vs FP"]
    if any(r.get("gpu_peak_bytes") for r in rows):  # a --device cuda run
        header += ["peak GPU GB", "vs FP"]
        for row, r in zip(body, rows):
            if "error" not in r:
                row += [f"{r['gpu_peak_bytes'] / gb:.2f}", ratio(r, "gpu_peak_bytes")]
    return _table(header, body)


def targets(q: dict) -> list[str]:
    """The issue's target claims, checked against the measured numbers (PSNR both pooled and per-image median)."""
    by = {r["name"]: r for r in q["rows"] if "error" not in r}
    lines = []
    mixed, fp = by.get("MixDQ W4A8 mixed"), by.get("FP32")
    for other in ("quanto int4", "SDNQ uint4", "MixDQ W4A8 uniform"):
        u = by.get(other)
        if mixed is None or u is None:
            continue
        pooled = mixed["psnr"] - u["psnr"]
        median = mixed["psnr_median"] - u["psnr_median"]
        dal = (mixed["alignment"]["all"] - u["alignment"]["all"]) * 100
        smaller = mixed["denoiser_bytes"] <= u["denoiser_bytes"]
        met = smaller and min(pooled, median) >= 3 and dal >= 5
        lines.append(
            f"- MixDQ W4A8 mixed vs {other}: size {mixed['denoiser_bytes'] / 1e6:.2f} vs "
            f"{u['denoiser_bytes'] / 1e6:.2f} MB ({'equal or smaller' if smaller else 'larger'}); PSNR "
            f"{median:+.2f} dB per-image median, {pooled:+.2f} dB pooled (target ≥ +3); alignment {dal:+.1f} points "
            f"(target ≥ +5): **{'met' if met else 'not met'}**"
        )
    w8 = by.get("MixDQ W8A8")
    if w8 is not None and fp is not None:
        d = (w8["alignment"]["all"] - fp["alignment"]["all"]) * 100
        one = 100 / q["settings"]["num_prompts"]
        lines.append(f"- MixDQ W8A8 vs FP32 alignment: {d:+.1f} points (target within 1 point; one prompt is "
                     f"{one:.1f} points): **{'met' if abs(d) <= 1 else 'not met'}**")
    return lines


def pareto_plot(q: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in q["rows"] if "error" not in r]
    markers = "osD^v<>pPX*hH"
    style = {r["name"]: (COLOURS.get(r["family"], "grey"), markers[i % len(markers)]) for i, r in enumerate(rows)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.8))
    metrics = [("psnr_median", "PSNR vs FP32 images, median over images (dB)"),
               ("all", "text alignment: all four attributes right (%)")]
    for ax, (key, label) in zip(axes, metrics):
        pts = []
        for r in rows:
            x = r["denoiser_bytes"] / 1e6
            y = r["alignment"]["all"] * 100 if key == "all" else r[key]
            if r["name"] == "FP32" and key != "all":
                continue  # the reference against itself
            pts.append((x, y))
            colour, marker = style[r["name"]]
            ax.scatter(x, y, s=55, color=colour, marker=marker, zorder=3, label=r["name"], alpha=0.85)
        front, best = [], -math.inf  # Pareto front: the best quality at this size or smaller
        for x, y in sorted(pts, key=lambda p: (p[0], -p[1])):
            if y > best:
                front.append((x, y))
                best = y
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", lw=1, ls="--", zorder=2)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "2357" else ""))
        ax.set_xlabel("demo UNet size in memory (MB, log scale)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    h2, l2 = axes[1].get_legend_handles_labels()
    for h, lab in zip(h2, l2):
        if lab not in labels:
            handles.append(h)
            labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=7, fontsize=8, frameon=False)
    n = q["settings"]["num_prompts"]
    fig.suptitle(f"Size vs quality on the bundled demo model ({n} prompts, same seeds for every variant; dashed: "
                 "Pareto front)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(q: dict | None, s: dict | None, command: str, plot: Path | None, gpu: dict | None = None) -> str:
    lines = [BEGIN, ""]
    info = (q or s or {}).get("machine") or machine()
    lines += [
        f"Command (from the repository root): `{command}`",
        "",
        f"Machine: {info['cpu']}, {info['cpus']} CPUs, {info['memory_bytes'] / 2**30:.0f} GiB RAM, no GPU; Python "
        f"{info['python']}; " + ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v) + ".",
        "",
    ]
    if q is not None:
        st = q["settings"]
        lines += [
            f"### Quality: bundled demo model ({st['num_prompts']} prompts, seeds 0..{st['num_prompts'] - 1}, "
            f"{st['steps']} steps, guidance {st['guidance']}, {st['height']}x{st['width']}; "
            f"{q['seconds'] / 60:.1f} min)",
            "",
        ]
        lines += quality_table(q)
        lines += ["", "Targets of issue #7 on these numbers:", ""] + targets(q) + [""]
        if plot is not None:
            lines += [f"![size vs quality]({plot.relative_to(REPO).as_posix()})", ""]
    if s is not None:
        st = s["settings"]
        lines += [
            f"### Size, memory, latency: real-size UNets, random weights ({s['device']}, latent "
            f"{st['latent']}x{st['latent']}, batch {st['batch']}, {st['threads']} torch thread"
            f"{'' if st['threads'] == 1 else 's'}, median of {st['repeats']} "
            f"steps after {st['warmup']} warm-up; {s['seconds'] / 60:.1f} min)",
            "",
        ]
        for key, arch in s["archs"].items():
            lines += [f"**{arch['label']}** (`{Path(arch['config']).name}`, FP32 checkpoint "
                      f"{arch['checkpoint_bytes'] / 1e9:.2f} GB)", ""]
            lines += size_table(arch, s["reference"]) + [""]
            plans = [(r["name"], r["plan"]) for r in arch["rows"] if r.get("plan")]
            if plans:
                lines += ["MixDQ widths on this UNet: " + "; ".join(f"{n}: {p}" for n, p in plans) + ".", ""]
    if gpu is not None:
        st = gpu["settings"]
        lines += [f"### GPU ({gpu.get('machine', {}).get('gpu', 'cuda')}; latent {st['latent']}x{st['latent']}, "
                  f"batch {st['batch']}, median of {st['repeats']} steps after {st['warmup']} warm-up)", ""]
        for arch in gpu["archs"].values():
            lines += [f"**{arch['label']}**", ""] + size_table(arch, gpu["reference"]) + [""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_benchmarks_md(block: str) -> None:
    if BENCHMARKS_MD.is_file():
        text = BENCHMARKS_MD.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            BENCHMARKS_MD.write_text(head + block.rstrip("\n") + tail)
            return
        BENCHMARKS_MD.write_text(text.rstrip("\n") + "\n\n" + block)
        return
    BENCHMARKS_MD.write_text("# Benchmarks against the peers\n\n" + block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report-only", action="store_true", help="only re-render the report from the JSON files")
    parser.add_argument("--skip-quality", action="store_true", help="keep the last peers_quality.json")
    parser.add_argument("--skip-size", action="store_true", help="keep the last peers_size.json")
    parser.add_argument("--num-prompts", type=int, default=128, help="demo prompts (default 128)")
    parser.add_argument("--archs", nargs="+", choices=["sd21", "sdxl"], default=["sd21", "sdxl"])
    parser.add_argument("--latent", type=int, default=32, help="latent size of the real-size step (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: all CPUs)")
    parser.add_argument("--half-step-archs", nargs="*", choices=["sd21", "sdxl"], default=["sd21"],
                        help="on a CPU, FP16 runs a single step on these UNets and none on the others")
    args = parser.parse_args()
    exe = Path(sys.executable)
    python = exe.relative_to(REPO).as_posix() if exe.is_relative_to(REPO) else "python"
    command = f"{python} benchmarks/peers.py" + "".join(
        f" {shlex.quote(a)}" for a in sys.argv[1:] if a != "--report-only")
    q_path, s_path = RESULTS / "peers_quality.json", RESULTS / "peers_size.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.report_only:
        import peers_quality
        import peers_size

        info = machine()
        if not args.skip_quality:
            q = peers_quality.run(args.num_prompts, threads=args.threads)
            q["machine"] = info
            q_path.write_text(json.dumps(q, indent=2) + "\n")
        if not args.skip_size:
            s = peers_size.run(args.archs, latent=args.latent, repeats=args.repeats, threads=args.threads,
                               half_step_archs=args.half_step_archs)
            s["machine"] = info
            s_path.write_text(json.dumps(s, indent=2) + "\n")
    q = json.loads(q_path.read_text()) if q_path.is_file() else None
    s = json.loads(s_path.read_text()) if s_path.is_file() else None
    if q is None and s is None:
        parser.error(f"no results in {RESULTS}: run without --report-only first")
    stored = (q or s).get("command")
    if args.report_only and stored:
        command = stored
    for d in (q, s):
        if d is not None and not args.report_only:
            d["command"] = command
    if not args.report_only:
        for d, p in ((q, q_path), (s, s_path)):
            if d is not None:
                p.write_text(json.dumps(d, indent=2) + "\n")
    plot = pareto_plot(q, RESULTS / "peers_pareto.png") if q is not None else None
    gpu_path = RESULTS / "peers_size_cuda.json"  # from `peers_size.py --device cuda`, where a GPU was available
    gpu = json.loads(gpu_path.read_text()) if gpu_path.is_file() else None
    block = report(q, s, command, plot, gpu)
    (RESULTS / "peers.md").write_text(block.replace(BEGIN + "\n", "").replace(END + "\n", ""))
    write_benchmarks_md(block)
    print(block)
    if not args.report_only:
        print(f"total {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
