"""Solve time of the bit-width allocation ILP (diffusers_mixdq.builder.allocate) at SDXL scale.

    python benchmarks/ilp_speed.py                  # writes benchmarks/results/ilp_speed.json

A seeded random problem: 1,000 layers x 3 candidate widths {2, 4, 8}, sizes log-uniform over 1e4 - 2e7 parameters
(the spread of SDXL's UNet layers), and SQNR-like scores (dB) that rise with the width and saturate, with
per-layer sensitivity spread over three decades and multiplicative noise: ``-10 log10(n0 + s_l * 4^-b * e)``.
Each configuration (band ``B ± 0.02`` as MixDQ solves it, and ``at most B`` as a size budget; B = 3, 4, 5) is
solved ``--runs`` times; the median and max of the wall time of ``solve()`` (model build + HiGHS + read-back) and of
HiGHS alone are reported with the status and MIP gap. The target is under 1 s per solve, exactly optimal
(``mip_rel_gap=0``, the default). ``--sub-mip-heuristics`` / ``--no-warm-start`` compare against HiGHS's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from diffusers_mixdq.builder.allocate import AllocationProblem, LayerChoice, solve  # noqa: E402

RESULTS = HERE / "results"
WIDTHS = (2, 4, 8)


def make_layers(n: int, seed: int) -> list[LayerChoice]:
    """``n`` layers with SDXL-like sizes and monotone, saturating, noisy SQNR-like scores at widths 2 / 4 / 8."""
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(np.log(1e4), np.log(2e7), n))
    sensitivity = 10 ** rng.uniform(-1, 2, n)
    floor = 1e-4  # the output noise of the rest of the model: scores saturate near 40 dB
    layers = []
    for i in range(n):
        noise = (1 + 0.1 * rng.normal(size=len(WIDTHS))) ** 2
        raw = [-10 * np.log10(floor + sensitivity[i] * 4.0**-b * e) for b, e in zip(WIDTHS, noise)]
        scores = dict(zip(WIDTHS, sorted(float(s) for s in raw)))  # monotone in width
        layers.append(LayerChoice(f"layer{i}", float(sizes[i]), "quality", scores))
    return layers


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=5, help="solves per configuration (median reported)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[3.0, 4.0, 5.0])
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--time-limit", type=float, default=60.0, help="HiGHS time limit per solve, seconds")
    ap.add_argument("--mip-rel-gap", type=float, default=0.0, help="0 = prove optimality (HiGHS default: 1e-4)")
    ap.add_argument("--sub-mip-heuristics", action="store_true", help="turn HiGHS's RINS/RENS back on")
    ap.add_argument("--no-warm-start", action="store_true", help="do not hand HiGHS the greedy start")
    ap.add_argument("--out", type=Path, default=RESULTS / "ilp_speed.json")
    args = ap.parse_args(argv)

    import highspy

    layers = make_layers(args.layers, args.seed)
    rows = []
    print(f"{args.layers} layers x {len(WIDTHS)} widths, seed {args.seed}, {args.runs} runs each, "
          f"mip_rel_gap={args.mip_rel_gap:g}, time_limit={args.time_limit:g}s, "
          f"sub-MIP heuristics {'on' if args.sub_mip_heuristics else 'off'}, "
          f"warm start {'off' if args.no_warm_start else 'on'}")
    print(f"{'mode':8} {'B':>4}  {'median s':>9} {'max s':>7} {'HiGHS med':>9}  {'status':8} {'gap':>8}  "
          "avg bits  widths")
    for mode in ("band", "at_most"):
        for budget in args.budgets:
            problem = AllocationProblem(layers, budget, args.tolerance, mode)
            allocs = [
                solve(
                    problem,
                    time_limit=args.time_limit,
                    mip_rel_gap=args.mip_rel_gap,
                    sub_mip_heuristics=args.sub_mip_heuristics,
                    warm_start=not args.no_warm_start,
                )
                for _ in range(args.runs)
            ]
            wall = [a.seconds for a in allocs]
            highs = [a.solver_seconds for a in allocs]
            a = allocs[0]
            same = all(x.choice == a.choice for x in allocs)
            row = dict(
                mode=mode,
                budget_bits=budget,
                tolerance=args.tolerance if mode == "band" else None,
                median_s=statistics.median(wall),
                max_s=max(wall),
                min_s=min(wall),
                highs_median_s=statistics.median(highs),
                runs_s=wall,
                status=sorted({x.status for x in allocs}),
                optimal=all(x.optimal for x in allocs),
                mip_gap=max(x.mip_gap for x in allocs),
                avg_bits=a.avg_bits,
                objective=a.objective,
                widths={str(b): n for b, n in a.counts().items()},
                deterministic=same,
            )
            rows.append(row)
            hist = " ".join(f"{n}x{b}" for b, n in a.counts().items())
            print(f"{mode:8} {budget:4g}  {row['median_s']:9.3f} {row['max_s']:7.3f} {row['highs_median_s']:9.3f}  "
                  f"{'/'.join(row['status']):8} {row['mip_gap']:8.2g}  {a.avg_bits:8.3f}  {hist}")

    medians = [r["median_s"] for r in rows]
    result = dict(
        benchmark="ilp_speed",
        layers=args.layers,
        widths=list(WIDTHS),
        seed=args.seed,
        runs=args.runs,
        mip_rel_gap=args.mip_rel_gap,
        time_limit_s=args.time_limit,
        sub_mip_heuristics=args.sub_mip_heuristics,
        warm_start=not args.no_warm_start,
        target_s=1.0,
        median_of_medians_s=statistics.median(medians),
        worst_median_s=max(medians),
        all_optimal=all(r["optimal"] for r in rows),
        all_under_target=all(m < 1.0 for m in medians),
        configs=rows,
        machine=dict(
            python=platform.python_version(),
            highs=f"{highspy.HIGHS_VERSION_MAJOR}.{highspy.HIGHS_VERSION_MINOR}.{highspy.HIGHS_VERSION_PATCH}",
            cpus=os.cpu_count(),
            load_average=os.getloadavg(),
            platform=platform.platform(),
        ),
    )
    print(f"median of medians {result['median_of_medians_s']:.3f} s, worst median {result['worst_median_s']:.3f} s, "
          f"all optimal: {result['all_optimal']}, all under 1 s: {result['all_under_target']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
