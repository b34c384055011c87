"""One layer's share of a plan's output noise, and what it becomes at another width (the refine stage's model,
:mod:`.refine`).

With the rest of the model at the current plan, the denoiser output's noise power ``N`` (``10^(-SQNR/10)``, relative
to the signal) is the rest's ``R`` plus the layer's ``n(b)`` at its width ``b``; a uniform quantizer's noise falls
about 4x per extra bit. So two measurements per layer give its whole ladder: ``N_up`` with the layer at its widest
candidate (``n(b) = (N - N_up) / (1 - 4^(b - up))``; at the widest already, from the step down instead) and
``N_down`` one candidate below (``n(down) = N_down - N + n(b)``, measured: narrow widths are where 4x per bit
fails); the widths between are interpolated log-linearly and the ones outside extrapolated 4x per bit
(:func:`~.width_ladder.estimate`). Pure arithmetic.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from .width_ladder import NOISE_RATIO_PER_BIT, estimate

#: a layer's noise is never taken as below this (a measured increase can be 0 or negative: noise cancelling)
TINY = 1e-12


def noise(sqnr_db: float) -> float:
    """Noise power relative to the signal from an SQNR in dB (0 for identical outputs)."""
    return 0.0 if math.isinf(sqnr_db) else 10 ** (-sqnr_db / 10)


def probe_widths(widths: Sequence[int], current: int) -> list[int]:
    """The widths a layer at ``current`` is measured at: the widest candidate (unless it is there) and the next
    candidate below (unless it is the narrowest)."""
    ws = sorted(set(widths))
    below = [w for w in ws if w < current]
    return ([ws[-1]] if ws[-1] > current else []) + ([below[-1]] if below else [])


def layer_deltas(widths: Sequence[int], current: int, total: float, measured: Mapping[int, float]) -> dict[int, float]:
    """Change of the plan's noise power at each candidate width (0 at ``current``), from the plan's noise
    ``total`` and the noise ``measured`` with the layer at the :func:`probe_widths` (see the module docstring)."""
    ws = sorted(set(widths))
    up = max(w for w in ws) if ws[-1] > current else None
    down = max((w for w in ws if w < current), default=None)
    if up is not None:
        own = (total - measured[up]) / (1 - NOISE_RATIO_PER_BIT ** (current - up))
    elif down is not None:
        own = (measured[down] - total) / (NOISE_RATIO_PER_BIT ** (current - down) - 1)
    else:
        return {current: 0.0}
    own = max(own, TINY)
    points = {current: own}
    if down is not None:
        points[down] = max(measured[down] - total + own, own)
    scores = {b: -p for b, p in points.items()}  # width_ladder's "mse" scores: minus the noise
    return {w: (points[w] if w in points else -estimate(scores, w, "mse")) - own for w in ws}
