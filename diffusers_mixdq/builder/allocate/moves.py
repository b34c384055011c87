"""Budget-keeping local moves from a plan (the refine stage's proposals, :mod:`diffusers_mixdq.builder.refine`).

A move changes a few layers' widths and keeps the total size within a limit: a **raise** (one layer one or more
candidate widths up) paid by lowering others one step each, cheapest predicted damage per freed bit first, until
the size fits again; or a **lower** (one layer one step down) whose freed bits raise others one step each, largest
predicted gain per bit first, while they fit. Predictions come from ``deltas[layer][width]``: the predicted change
of the plan's error when that layer alone takes that width (0 at its current width; lower is better), e.g. measured
with the rest of the model at the current plan. Pure arithmetic: no torch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .sweep import MIN_MSE, objective

#: paired bootstrap resamples behind the ``"tail"`` objective's standard error (:func:`tail_gain`)
TAIL_RESAMPLES = 1000


@dataclass(frozen=True)
class Move:
    """``changes``: layer -> new width; ``predicted``: the summed predicted change of the error (lower is better)."""

    changes: dict[str, int] = field(hash=False)
    predicted: float
    kind: str = "swap"

    @property
    def key(self) -> tuple:
        return tuple(sorted(self.changes.items()))


def size_bits(choice: Mapping[str, float], sizes: Mapping[str, float]) -> float:
    """Total bits of ``choice`` (width x size summed over the layers of ``sizes``)."""
    return float(sum(sizes[n] * choice[n] for n in sizes))


def _step(widths: list[int], current: int, up: bool) -> int | None:
    """The next candidate width above (``up``) or below ``current``; ``None`` at the end of the ladder."""
    options = [w for w in widths if (w > current if up else w < current)]
    return (min(options) if up else max(options)) if options else None


def _greedy(choice: dict, deltas, sizes, limit: float, touched: set, lower: bool) -> tuple[float, bool]:
    """Lower (``lower``) layers one step until ``choice`` fits ``limit``, or raise them while they fit and gain;
    in place, skipping ``touched`` layers. Returns the predicted change and whether the size fits."""
    predicted = 0.0
    while True:
        total = size_bits(choice, sizes)
        if lower and total <= limit:
            return predicted, True
        best, best_rate = None, None
        for n, by_width in deltas.items():
            w = _step(sorted(by_width), choice[n], up=not lower) if n not in touched else None
            if w is None:
                continue
            bits = abs(w - choice[n]) * sizes[n]
            if not lower and total + bits > limit:
                continue
            rate = by_width[w] / bits  # damage per freed bit (lower) / gain per spent bit (raise, negative)
            if best_rate is None or rate < best_rate:
                best, best_rate = (n, w), rate
        if best is None or (not lower and best_rate >= 0):
            return predicted, not lower or total <= limit
        n, w = best
        predicted += deltas[n][w]
        choice[n] = w
        touched.add(n)


def swap_moves(choice: Mapping[str, int], deltas: Mapping[str, Mapping[int, float]], sizes: Mapping[str, float],
               limit: float) -> list[Move]:
    """Every raise and lower move from ``choice`` whose size stays within ``limit`` bits (``sizes``: every
    layer's, fixed ones included; ``deltas``: the free layers' candidate widths and predictions, see the module
    docstring), distinct, best predicted first."""
    moves: dict[tuple, Move] = {}
    for n, by_width in deltas.items():
        for w in sorted(by_width):
            if w == choice[n] or (w < choice[n] and w != _step(sorted(by_width), choice[n], up=False)):
                continue
            new, touched = dict(choice), {n}
            new[n] = w
            rest, fits = _greedy(new, deltas, sizes, limit, touched, lower=w > choice[n])
            changes = {m: int(new[m]) for m in touched if new[m] != choice[m]}
            if fits and len(changes) > 1:
                move = Move(changes, by_width[w] + rest, "raise" if w > choice[n] else "lower")
                moves.setdefault(move.key, move)
    return sorted(moves.values(), key=lambda m: (m.predicted, m.key))


def paired_gain(new: Sequence[float], old: Sequence[float], kind: str) -> float:
    """How many standard errors ``new`` per-image errors improve on ``old`` (the same images), paired: the mean of
    the per-image improvement (in dB for the ``"psnr"`` objective, in MSE for ``"mse"``) over its standard error;
    for ``"tail"`` the improvement of the tail objective itself (:func:`tail_gain`). A few prompts' mean moves by
    chance as much as a plan change moves it (on `scenes` one standard error of 48 images is 0.4-0.7 dB), so a
    proposal is kept only when this exceeds the refine stage's ``significance``."""
    if kind == "tail":
        return tail_gain(new, old)
    f = (lambda e: 10 * math.log10(max(e, MIN_MSE))) if kind == "psnr" else float
    d = [f(o) - f(n) for n, o in zip(new, old)]
    if not d:
        return 0.0
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1)) if len(d) > 1 else 0.0
    return _in_errors(mean, sd / math.sqrt(len(d)))


def tail_gain(new: Sequence[float], old: Sequence[float], resamples: int = TAIL_RESAMPLES, seed: int = 0) -> float:
    """How many standard errors the ``"tail"`` objective (the mean of the worst images' errors) of ``new`` improves
    on ``old`` (the same images). The tail is not a mean over images, so its standard error is a paired bootstrap:
    the spread of the improvement over ``resamples`` resamples of the images, each drawn for both plans alike (a
    fixed ``seed``: the same errors always give the same answer, so a resumed build decides the same)."""
    n = len(new)
    if n == 0:
        return 0.0
    rng = random.Random(seed)
    d = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        d.append(objective([old[i] for i in idx], "tail") - objective([new[i] for i in idx], "tail"))
    mean = sum(d) / len(d)
    return _in_errors(objective(old, "tail") - objective(new, "tail"),
                      math.sqrt(sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1)))


def _in_errors(gain: float, se: float) -> float:
    """``gain`` in standard errors ``se``; a gain without spread is infinitely significant (or 0 when none)."""
    if se == 0:
        return math.inf if gain > 0 else (0.0 if gain == 0 else -math.inf)
    return gain / se
