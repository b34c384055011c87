"""Paired tests between any two variants of one `mixdq eval` run, from its per-image results (the `results.json`
that `mixdq eval --out DIR` writes; `mixdq eval --compare` prints one pair only):

    python benchmarks/paired.py DIR/results.json w8a4-token:w8a4-dyn w8a4-tg4:w8a4

Per variant: median / 10th percentile of the per-image PSNR to full precision, images below 20 dB, aligned share;
per pair ``A:B``: the Wilcoxon signed-rank test of the per-image PSNR and McNemar's exact test of alignment
(:func:`diffusers_mixdq.evaluation.compare`).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from diffusers_mixdq.evaluation import compare
from diffusers_mixdq.evaluation.results import VariantResult


def variant(d: dict) -> VariantResult:
    return VariantResult(name=d["name"], denoiser_bytes=d["denoiser_bytes"], seconds_per_image=d["seconds_per_image"],
                         psnr_per_image=d["psnr_per_image"], aligned=d["aligned"])


def main(path: str, pairs: list[str]) -> None:
    rows = {d["name"]: d for d in json.loads(open(path, encoding="utf-8").read())}
    for name, d in rows.items():
        if d["psnr_per_image"]:
            p = np.asarray(d["psnr_per_image"])
            print(f"{name}: {d['avg_weight_bits']:.2f} weight bits, PSNR median {np.median(p):.2f} dB, "
                  f"p10 {np.percentile(p, 10):.2f} dB, diverged {int((p < 20).sum())}, "
                  f"aligned {100 * np.mean(d['aligned']):.1f}%")
    for pair in pairs:
        a, b = pair.split(":")
        c = compare(variant(rows[a]), variant(rows[b]))
        print(f"{a} vs {b}: PSNR median paired difference {c.psnr.median_difference:+.2f} dB "
              f"(Wilcoxon p = {c.psnr.p_value:.2g}); alignment {c.alignment_diff:+.1f} points "
              f"(McNemar p = {c.mcnemar.p_value:.2g})")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
