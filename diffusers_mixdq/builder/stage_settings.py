"""The settings of the builder's stages beyond MixDQ's own (issue #14), shared by :class:`~.settings.BuildSettings`
and :class:`~.recipe.Recipe` so that both spell them once. Every stage but refine is off by default."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence


@dataclass(kw_only=True)
class StageSettings:
    """Channel balancing and low-rank branches (the correct stage, :mod:`.correct`): balancing over the
    ``balance_alphas`` grid, branches of ``lowrank_rank`` on the layers matching ``lowrank_layers`` (empty: all).
    Distillation (:mod:`.distill`, off while ``distill_seconds`` is 0): adapters of ``distill_rank`` trained with
    Adam (``distill_lr``) on output MSE + ``distill_relation`` x the last block's relation KL. Static activation
    ranges per ``act_timestep_groups`` groups of the sampler's timesteps (:mod:`.timestep_ranges`; 0: off);
    ``outlier_fraction`` of each int4 / int2 layer's output channels kept at int8 too (:mod:`.outlier_channels`).
    Sensitivities measured with everything else in full precision (``context="fp"``, MixDQ) or at the uniform base
    width (``"uniform"``); ``pick_uniform`` adds the same-size uniform plan to the pick (:mod:`.uniform_context`);
    ``content_metric`` scores content layers by SSIM of the images (MixDQ) or ``"mse"`` (minus their mean
    per-image MSE). ``measure_widths``: the candidate weight widths actually measured (``None``: all); the others
    are estimated from them (:mod:`.width_ladder`). The refine stage (:mod:`.refine`, off while
    ``refine_evaluations`` is 0; ``None``, the default: :data:`~.options.DEFAULT_REFINE_EVALUATIONS` in a
    denoiser-only mixed build, skipped with text-encoder ``components``): at most that many whole-plan evaluations
    on the pick prompts and ``refine_rounds`` in-plan measurements, judged by ``refine_objective`` (``None``: the pick's); a proposal is
    kept when its paired per-image improvement exceeds ``refine_significance`` standard errors and, with
    ``refine_guard``, it adds no diverged image and does not worsen the tail as significantly (:mod:`.refine_guard`)."""

    balance: bool = False
    balance_alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75)
    lowrank_rank: int = 0
    lowrank_layers: Sequence[str] = ()
    distill_seconds: float = 0.0
    distill_rank: int = 4
    distill_lr: float = 1e-3
    distill_relation: float = 1.0
    act_timestep_groups: int = 0
    outlier_fraction: float = 0.0
    context: str = "fp"
    pick_uniform: bool = False
    content_metric: str = "ssim"
    measure_widths: Sequence[int] | None = None
    refine_evaluations: int | None = None
    refine_rounds: int = 1
    refine_objective: str | None = None
    refine_significance: float = 2.0
    refine_guard: bool = True

    def stage_values(self) -> dict[str, Any]:
        """These settings by name (sequences as lists)."""
        values = {f.name: getattr(self, f.name) for f in fields(StageSettings)}
        return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()}
