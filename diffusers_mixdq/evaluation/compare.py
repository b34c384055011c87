"""``mixdq eval --compare A B``: paired tests between two variants on the same prompts and seeds.

Alignment: McNemar's exact test on the images only one of the two aligns, and a paired bootstrap interval of the
difference in points. Fidelity: Wilcoxon's signed-rank test on the per-image PSNRs to full precision (higher is
closer), with the median paired difference and the rank-biserial correlation as effect sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .results import VariantResult
from .stats import McNemar, Wilcoxon, bootstrap_ci, mcnemar_exact, wilcoxon_signed_rank


@dataclass(frozen=True)
class Comparison:
    """Paired tests of variant ``a`` against ``b``. ``alignment_diff``: points of ``a`` minus ``b``, with its paired
    bootstrap interval ``alignment_ci``; ``psnr``: Wilcoxon on per-image PSNR (``a`` vs ``b``). Each part is None
    where it does not apply (no scorer; one of them is the full-precision reference)."""

    a: str
    b: str
    n: int
    mcnemar: McNemar | None = None
    alignment_diff: float | None = None
    alignment_ci: tuple[float, float] | None = None
    psnr: Wilcoxon | None = None


def compare(a: VariantResult, b: VariantResult, *, resamples: int = 2000, seed: int = 0) -> Comparison:
    """Paired tests of ``a`` against ``b`` (results of the same run: same prompts, same seeds)."""
    n = len(a.images) if a.images is not None else len(a.aligned or a.psnr_per_image or [])
    out = {}
    if a.aligned is not None and b.aligned is not None:
        x, y = np.asarray(a.aligned, dtype=float), np.asarray(b.aligned, dtype=float)
        lo, hi = bootstrap_ci(x - y, resamples=resamples, seed=seed)
        out.update(mcnemar=mcnemar_exact(a.aligned, b.aligned), alignment_diff=100 * float((x - y).mean()),
                   alignment_ci=(100 * lo, 100 * hi))
    if a.psnr_per_image is not None and b.psnr_per_image is not None:
        out["psnr"] = wilcoxon_signed_rank(a.psnr_per_image, b.psnr_per_image)
    return Comparison(a.name, b.name, n, **out)


def _verdict(better: str | None, p: float, alpha: float) -> str:
    if better is None or p >= alpha:
        return f"no significant difference (p = {p:.3g} ≥ {alpha:g})"
    return f"{better} is better (p = {p:.3g} < {alpha:g})"


def describe(c: Comparison, alpha: float = 0.05) -> list[str]:
    """Plain-language lines: per metric, which variant is better and how sure (two-sided p-values at ``alpha``)."""
    lines = [f"{c.a} vs {c.b}, {c.n} paired images:"]
    if c.mcnemar is None:
        lines.append("  alignment: not scored (no scorer for these prompts)")
    else:
        m = c.mcnemar
        better = c.a if m.only_a > m.only_b else c.b if m.only_b > m.only_a else None
        lines.append(
            f"  alignment: {c.alignment_diff:+.1f} points for {c.a} (95% paired bootstrap CI {c.alignment_ci[0]:+.1f}"
            f" to {c.alignment_ci[1]:+.1f}); only {c.a} aligned {m.only_a}, only {c.b} aligned {m.only_b}; McNemar "
            f"exact: {_verdict(better, m.p_value, alpha)}"
        )
    if c.psnr is None:
        lines.append("  PSNR to full precision: does not apply (one of them is the full-precision reference)")
    else:
        w = c.psnr
        better = c.a if w.rank_biserial > 0 else c.b if w.rank_biserial < 0 else None
        lines.append(
            f"  PSNR to full precision: median paired difference {w.median_difference:+.2f} dB for {c.a}, "
            f"rank-biserial r = {w.rank_biserial:+.2f} ({w.n} non-zero pairs); Wilcoxon signed-rank "
            f"({'exact' if w.exact else 'normal approximation'}): {_verdict(better, w.p_value, alpha)}"
        )
    return lines
