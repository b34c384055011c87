"""The measured error of a whole plan: its images on the pick (validation) prompts against full precision, one MSE
per image. The allocate stage's final pick (:mod:`.assign`) and the refine stage (:mod:`.refine`) both judge plans
by it."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..plan import BitPlan
from .context import BuildContext
from .recording import Calibration
from .sensitivity import applied
from .settings import run_pipeline


def image_errors(ctx: BuildContext, calib: Calibration, plan: BitPlan, reference: torch.Tensor,
                 also=None) -> list[float]:
    """Per-image MSE of ``plan``'s images of the pick prompts against ``reference`` (the plan applied in memory,
    then restored); ``also``: a context manager applied at the same time (other components' plans)."""
    with applied(ctx.denoiser, plan, calib.bos_state), torch.no_grad(), (also or nullcontext()):
        images = run_pipeline(ctx.pipe, ctx.settings.pick_settings)
    return (images - reference).pow(2).flatten(1).mean(1).tolist()
