"""Candidate widths that are estimated instead of measured (``measure_widths``): a finer width ladder
({2, 3, 4, 5, 6, 8}) at the measuring cost of a coarse one ({2, 4, 8}).

A layer's quantization noise power falls about 4x per extra bit (uniform quantizer, fixed range), and for small
noise every score the measure stage uses moves with it: SQNR in dB by +6.02 dB per bit, SSIM loss and image MSE
in proportion to the noise power. So each score is turned into a *damage* (noise power up to a constant: ``1 -
SSIM``, the MSE, ``10^(-SQNR/10)``), an unmeasured width's damage is interpolated log-linearly between the nearest
measured widths below and above (geometric mean for a width half-way), or, beyond the measured ones, taken 4x
smaller (larger) per bit, and turned back into a score. A layer with no measured score gets none.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

#: noise power per extra bit of a uniform quantizer
NOISE_RATIO_PER_BIT = 4.0
_TINY = 1e-30


def damage(score: float, metric: str) -> float:
    """The noise power (up to a constant) that ``score`` under ``metric`` stands for (0: none)."""
    if metric == "sqnr_db":
        return 10 ** (-score / 10)
    return max(-score, 0.0) if metric == "mse" else max(1.0 - score, 0.0)


def score_of(value: float, metric: str) -> float:
    """The inverse of :func:`damage`."""
    if metric == "sqnr_db":
        return -10 * math.log10(max(value, _TINY))
    return -value if metric == "mse" else 1.0 - value


def estimate(scores: Mapping[int, float], bits: int, metric: str) -> float:
    """The score at ``bits`` from the measured ``scores`` (``{width: score}``, not empty): see the module docstring."""
    below = [w for w in scores if w < bits]
    above = [w for w in scores if w > bits]
    if below and above:
        lo, hi = max(below), min(above)
        d_lo, d_hi = (max(damage(scores[w], metric), _TINY) for w in (lo, hi))
        t = (bits - lo) / (hi - lo)
        return score_of(math.exp((1 - t) * math.log(d_lo) + t * math.log(d_hi)), metric)
    near = max(below) if below else min(above)
    return score_of(damage(scores[near], metric) / NOISE_RATIO_PER_BIT ** (bits - near), metric)


def measured_widths(widths: Mapping[str, Sequence[int]], measure: Sequence[int] | None) -> dict[str, list[int]]:
    """The widths to measure per group: the candidates that ``measure`` lists (``None``: every candidate). A group
    keeps at least one: its candidate nearest to a listed width (the narrowest on a tie)."""
    if measure is None:
        return {g: list(ws) for g, ws in widths.items()}
    out = {}
    for g, ws in widths.items():
        kept = [w for w in ws if w in measure]
        out[g] = kept or [min(ws, key=lambda w: (min(abs(w - m) for m in measure), w))] if ws else []
    return out


def fill_estimates(scores: dict[str, dict[int, float]], widths: Mapping[str, Sequence[int]],
                   groups: Mapping[str, str], metric: Mapping[str, str]) -> int:
    """Give every layer a score at each candidate width of its group that it lacks (in place); the number filled."""
    filled = 0
    for name, by_width in scores.items():
        if not by_width:
            continue
        measured = dict(by_width)
        for bits in widths[groups[name]]:
            if bits not in by_width:
                by_width[bits] = estimate(measured, bits, metric[groups[name]])
                filled += 1
    return filled
