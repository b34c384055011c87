"""Issue #14's ablation table from `mixdq eval` runs of the plans of examples/build_ablation_plans.py:

    python benchmarks/ablation_table.py --model shapes --baseline mixed _work/ablation/eval_shapes_a/results.json \
        _work/ablation/eval_shapes_b/results.json

Every run must use the same test prompts and image seeds (``--num-prompts 128 --seed 0``), so the runs' per-image
results pair up (the variants of one table may come from several runs: each `mixdq eval` run stays under ten
minutes). Per variant: average weight bits, median / 10th percentile of the per-image PSNR to full precision, images
below 20 dB, aligned share with its 95% interval, and against ``--baseline`` the median paired PSNR difference with
Wilcoxon's signed-rank p and the alignment difference with McNemar's exact p (benchmarks/paired.py's tests);
``--pair A:B`` (repeatable) adds a pair (e.g. ``--pair uniform-token:uniform``).
Writes ``benchmarks/results/ablation_<model>.json`` (``--name refine``: ``refine_<model>.json``) (the table's numbers) and ``..._details.json`` (per image), and
prints the table in Markdown.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from _common import RESULTS
from paired import variant
from diffusers_mixdq.evaluation import compare


def merged(paths: list[str]) -> dict[str, dict]:
    """The variants of several runs by name (a name in two runs must have the same per-image PSNR)."""
    rows: dict[str, dict] = {}
    for path in paths:
        for d in json.loads(open(path, encoding="utf-8").read()):
            old = rows.setdefault(d["name"], d)
            if old["psnr_per_image"] and not np.allclose(old["psnr_per_image"], d["psnr_per_image"]):
                raise SystemExit(f"{d['name']} differs between runs: not the same prompts and seeds?")
    return rows


def paired(rows: dict[str, dict], a: str, b: str) -> dict:
    """Variant ``a`` against ``b``: median paired PSNR difference (Wilcoxon p), alignment points (McNemar p)."""
    c = compare(variant(rows[a]), variant(rows[b]))
    return {"vs": b, "psnr_median_diff_db": c.psnr.median_difference, "wilcoxon_p": c.psnr.p_value,
            "aligned_diff": c.alignment_diff, "mcnemar_p": c.mcnemar.p_value}


def summary(rows: dict[str, dict], baseline: str) -> list[dict]:
    out = []
    for name, d in rows.items():
        row = {"variant": name, "avg_weight_bits": d["avg_weight_bits"], "aligned": 100 * float(np.mean(d["aligned"])),
               "aligned_ci": (d.get("summary") or {}).get("aligned_ci")}
        if d["psnr_per_image"]:
            p = np.asarray(d["psnr_per_image"])
            row.update(psnr_median_db=float(np.median(p)), psnr_p10_db=float(np.percentile(p, 10)),
                       diverged=int((p < 20).sum()))
            if name != baseline:
                row.update(paired(rows, name, baseline))
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| variant | W bits | PSNR median dB | PSNR p10 dB | diverged (<20 dB) | aligned % [95% CI] "
             "| vs baseline: ΔPSNR median dB (Wilcoxon p) | Δ aligned pts (McNemar p) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = f" [{r['aligned_ci'][0]:.1f}-{r['aligned_ci'][1]:.1f}]" if r.get("aligned_ci") else ""
        fid = (f"{r['psnr_median_db']:.2f} | {r['psnr_p10_db']:.2f} | {r['diverged']}" if "psnr_median_db" in r
               else "- | - | -")
        vs = (f"{r['psnr_median_diff_db']:+.2f} ({r['wilcoxon_p']:.2g}) | {r['aligned_diff']:+.1f} "
              f"({r['mcnemar_p']:.2g})" if "vs" in r else " | ")
        lines.append(f"| {r['variant']} | {r['avg_weight_bits']:.2f} | {fid} | {r['aligned']:.1f}{ci} | {vs} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="names the results files (<name>_<model>*.json)")
    parser.add_argument("--name", default="ablation", help="names the results files (default: ablation)")
    parser.add_argument("--baseline", default="mixed")
    parser.add_argument("--pair", action="append", default=[], metavar="A:B", help="a paired test more (repeatable)")
    parser.add_argument("runs", nargs="+", help="results.json of `mixdq eval --out DIR` runs")
    args = parser.parse_args(argv)
    rows = merged(args.runs)
    result = summary(rows, args.baseline)
    pairs = [{"variant": a, **paired(rows, a, b)} for a, b in (p.split(":") for p in args.pair)]
    (RESULTS / f"{args.name}_{args.model}.json").write_text(json.dumps(result + pairs, indent=1) + "\n")
    (RESULTS / f"{args.name}_{args.model}_details.json").write_text(json.dumps(list(rows.values())) + "\n")
    print(table(result))
    for r in pairs:
        print(f"{r['variant']} vs {r['vs']}: {r['psnr_median_diff_db']:+.2f} dB (Wilcoxon p = {r['wilcoxon_p']:.2g}), "
              f"{r['aligned_diff']:+.1f} points aligned (McNemar p = {r['mcnemar_p']:.2g})")


if __name__ == "__main__":
    main()
