"""The refine stage's tail guard (:mod:`.refine`, ``refine_guard``, on by default): a proposal that improves the
refine objective is still rejected when it makes the tail of the pick prompts' images worse.

Why: the default objective, the mean per-image PSNR, counts a typical image as much as a broken one, so a move can
buy many small gains with a few images that turn into another scene. (On `scenes` W3A8 the refine default's kept
move went with 13 -> 16 diverged test images; that one was chance, 9 images down and 6 up with the worst 10% no
worse, and on the validation images it had fewer diverged, so the guard keeps it: BENCHMARKS.md "Tail guard".)
Two rules, each judged on the same images as the objective:

* **diverged**: more images below :data:`~diffusers_mixdq.evaluation.images.DIVERGED_DB` (20 dB PSNR to full
  precision, the threshold ``mixdq eval`` counts) than before the move. An image that diverges shows another scene;
  the issue's targets ask for no more of them, so, like the budget, this is a constraint, not a trade.
* **tail**: the ``"tail"`` objective (the mean error of the worst 10% of images) worse by more than the stage's
  ``significance`` standard errors (:func:`~.allocate.moves.tail_gain`, a paired bootstrap) — the same evidence the
  stage asks of a gain, asked of a loss.

Pure arithmetic on per-image MSE of images in [0, 1]: no torch.
"""

from __future__ import annotations

from typing import Sequence

from ..evaluation.images import DIVERGED_DB
from .allocate.moves import tail_gain

#: per-image MSE above this is a PSNR below :data:`DIVERGED_DB` (images in [0, 1])
DIVERGED_MSE = 10 ** (-DIVERGED_DB / 10)


def diverged(errors: Sequence[float]) -> int:
    """How many per-image MSEs are a PSNR below :data:`DIVERGED_DB` (diverged images)."""
    return sum(1 for e in errors if e > DIVERGED_MSE)


def guard(new: Sequence[float], old: Sequence[float], significance: float) -> str | None:
    """Why ``new`` per-image errors must not replace ``old`` (the same images) although the objective improved,
    or ``None`` when the tail allows it (see the module docstring)."""
    before, after = diverged(old), diverged(new)
    if after > before:
        return f"diverged images {before} -> {after}"
    z = tail_gain(new, old)
    if z < -significance:
        return f"tail worse by {-z:.2f} standard errors"
    return None
