"""What to build (:class:`BuildSettings`) and what a build reports (:class:`BuildReport`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from pydantic import ValidationError

from ..errors import MixDQError
from ..families import family_of
from .allocate import DEFAULT_ALLOCATOR
from .options import (DEFAULT_PICK_OBJECTIVE, DEFAULT_SPLIT_RATIOS, BuildOptions, Labels,
                      default_activation_mode, error_from, not_held_out)
from .stage_settings import StageSettings

#: how a settings field is spelled, for the option paths that differ (see :mod:`.options`)
SETTINGS_LABELS = Labels(
    {
        ("activations", "mode"): "activations",
        ("activations", "candidates"): "act_widths",
        ("activations", "budget_bits"): "act_bits",
        ("activations", "protect_most_sensitive"): "act_protect",
        ("weights", "candidates"): "widths",
        ("activations", "timestep_groups"): "act_timestep_groups",
        ("weights", "outlier_fraction"): "outlier_fraction",
        ("weights", "measure"): "measure_widths",
        ("refine", "evaluations"): "refine_evaluations",
        ("refine", "rounds"): "refine_rounds",
        ("refine", "objective"): "refine_objective",
        ("refine", "significance"): "refine_significance",
        ("refine", "guard"): "refine_guard",
    },
    lambda loc: ".".join(map(str, loc)),
)


@dataclass
class BuildSettings(StageSettings):
    """What to build. ``weight_bits`` is the parameter-weighted average weight width (protected layers count at
    16 bits); ``activations`` is ``"int8"`` (static, calibrated), ``"dynamic"`` (run-time range per tensor),
    ``"dynamic-token"`` (run-time range per token: the default, :data:`~.options.DEFAULT_ACTIVATION_MODE`; with
    ``act_timestep_groups`` the default is ``"int8"``, static ranges per group) or ``"none"``.

    Activations: ``act_widths`` are the candidate activation widths (4 and/or 8), ``act_bits`` the
    element-weighted average over quantized inputs (default: the widest candidate), and the ``act_protect``
    most activation-sensitive layers keep their inputs unquantized (MixDQ keeps a few). ``sweep_fraction`` is
    the share of the calibration samples each sensitivity measurement uses (1.0: the naive protocol).
    ``content_fraction`` is the share of the prompts a content-layer measurement
    generates (at least :data:`~.measure.MIN_CONTENT_PROMPTS`: image metrics on too few prompts pick the wrong
    layers), and ``extrapolate_widest`` estimates content layers' widest candidate instead of measuring it.
    ``content_patterns``: the content group (``None``: the denoiser family's, :mod:`diffusers_mixdq.families`).
    ``allocator``: how widths are chosen (:data:`~.allocate.ALLOCATORS`, default the HiGHS ILP).
    ``device``: where the pipeline runs during the build (default: where it is); in a sharded build on CUDA
    machines every process takes its own GPU.

    The final pick among the ``k`` sweep's candidates (:mod:`.assign`): ``pick_prompts`` are held-out (validation)
    prompts it generates on (default, empty: the calibration prompts, as before; they may not share a prompt with
    ``prompts``), ``pick_objective`` what it minimises over the per-image MSE to full precision (``"psnr"``: minus
    the mean per-image PSNR, the default, :data:`~.options.DEFAULT_PICK_OBJECTIVE`; ``"mse"``: the mean, the
    default before issue #14; ``"tail"``: the mean of the worst :data:`~.allocate.TAIL_FRACTION` of images).
    ``pick_uniform`` adds the uniform plan at the base width to the candidates; ``context="uniform"`` measures
    sensitivities inside that uniform model (:mod:`.uniform_context`); ``content_metric="mse"`` scores content
    layers by minus the mean per-image MSE instead of SSIM.
    ``protect_first_last`` adds the denoiser family's ``first_last`` layers (:mod:`diffusers_mixdq.families`) to
    ``protected`` (kept in 16 bit)."""

    prompts: Sequence[str]
    weight_bits: float = 4.0
    #: None: :func:`~.options.default_activation_mode` (``"dynamic-token"``; ``"int8"`` with ``act_timestep_groups``)
    activations: str | None = None
    steps: int = 4
    guidance: float = 1.0
    height: int | None = None
    width: int | None = None
    seed: int = 0
    widths: dict[str, list[int]] = field(default_factory=lambda: {"content": [2, 4, 8], "quality": [4, 8]})
    content_patterns: Sequence[str] | None = None
    protected: Sequence[str] = ()
    split_ratios: Sequence[float] = DEFAULT_SPLIT_RATIOS
    budget_mode: str = "at_most"
    tolerance: float = 0.02
    bos: bool = True
    component: str | None = None
    #: directory for the calibration cache and the resumable sensitivity cache (None: no cache)
    cache_dir: str | None = None
    sweep_fraction: float = 0.25
    content_fraction: float = 0.5
    extrapolate_widest: bool = True
    act_widths: list[int] = field(default_factory=lambda: [8])
    act_bits: float | None = None
    act_protect: int = 0
    device: str | None = None
    allocator: str = DEFAULT_ALLOCATOR
    #: weight sensitivities measured elsewhere, ``[{path, widths, prefix}]`` (:mod:`.published`): not measured again
    sensitivity_files: Sequence[dict] = ()
    #: extra keyword arguments of every pipeline call (a DiT pipeline's ``use_resolution_binning=False``, ...)
    pipe_kwargs: dict = field(default_factory=dict)
    pick_prompts: Sequence[str] = ()
    pick_objective: str = DEFAULT_PICK_OBJECTIVE
    protect_first_last: bool = False
    #: pipeline components to build plans for (empty: the denoiser alone), the budget over them (``"joint"``: one
    #: average over every component's layers; ``"per_component"``: ``component_budgets[c]``, else ``weight_bits``,
    #: each) and the candidate widths of text-encoder layers (:mod:`.text_encoders`)
    components: Sequence[str] = ()
    budget_scope: str = "joint"
    component_budgets: dict = field(default_factory=dict)
    text_encoder_widths: list[int] = field(default_factory=lambda: [4, 8])

    def __post_init__(self) -> None:
        if self.activations is None:
            self.activations = default_activation_mode(self.act_timestep_groups)

    def options(self) -> dict[str, Any]:
        """These settings laid out as :class:`~.options.BuildOptions` fields."""
        return {
            "component": self.component, "steps": self.steps, "guidance": self.guidance, "height": self.height,
            "width": self.width, "seed": self.seed,
            "weights": {"candidates": dict(self.widths), "outlier_fraction": self.outlier_fraction,
                        "measure": None if self.measure_widths is None else _as_list(self.measure_widths)},
            "activations": {"mode": self.activations, "candidates": list(self.act_widths),
                            "budget_bits": self.act_bits, "protect_most_sensitive": self.act_protect,
                            "timestep_groups": self.act_timestep_groups},
            "protected": list(self.protected), "split_ratios": list(self.split_ratios),
            "content_patterns": None if self.content_patterns is None else list(self.content_patterns),
            "budget_mode": self.budget_mode, "sweep_fraction": self.sweep_fraction,
            "content_fraction": self.content_fraction, "device": self.device, "allocator": self.allocator,
            "sensitivity_files": [dict(e) for e in self.sensitivity_files], "pipe_kwargs": self.pipe_kwargs,
            "pick_prompts": _as_list(self.pick_prompts), "pick_objective": self.pick_objective,
            "protect_first_last": self.protect_first_last, "balance": self.balance,
            "balance_alphas": _as_list(self.balance_alphas), "lowrank_rank": self.lowrank_rank,
            "lowrank_layers": _as_list(self.lowrank_layers), "distill_seconds": self.distill_seconds,
            "distill_rank": self.distill_rank, "distill_lr": self.distill_lr, "distill_relation": self.distill_relation,
            "context": self.context,
            "pick_uniform": self.pick_uniform, "content_metric": self.content_metric,
            "components": _as_list(self.components), "budget_scope": self.budget_scope,
            "component_budgets": dict(self.component_budgets),
            "text_encoder_widths": _as_list(self.text_encoder_widths),
            "refine": {"evaluations": self.refine_evaluations, "rounds": self.refine_rounds,
                       "objective": self.refine_objective, "significance": self.refine_significance,
                       "guard": self.refine_guard},
        }

    def validate(self) -> None:
        """Check the settings against :class:`~.options.BuildOptions` (the rules recipes follow too)."""
        try:
            BuildOptions.model_validate(self.options())
        except ValidationError as e:
            raise error_from(e, BuildOptions, SETTINGS_LABELS) from None
        message = not_held_out(self.prompts, self.pick_prompts)
        if message:
            raise MixDQError(message.replace("<>", "pick_prompts"))

    def for_model(self, denoiser) -> "BuildSettings":
        """These settings with the defaults that depend on the model filled in: the content patterns and, with
        ``protect_first_last``, the family's first and last layers among the protected ones."""
        family = family_of(denoiser)
        content = tuple(family.content) if self.content_patterns is None else self.content_patterns
        protected = tuple(self.protected)
        if self.protect_first_last:
            protected += tuple(p for p in family.first_last if p not in protected)
        return replace(self, content_patterns=content, protected=protected)

    @property
    def pick_settings(self) -> "BuildSettings":
        """The settings the final pick generates with: the pick prompts in place of the calibration prompts."""
        return replace(self, prompts=tuple(self.pick_prompts)) if self.pick_prompts else self

    @property
    def activation_sweep(self) -> bool:
        """Whether an activation decision is left to make (else activations are not measured)."""
        return self.activations != "none" and (len(set(self.act_widths)) > 1 or self.act_protect > 0)


@dataclass
class BuildReport:
    """Numbers from a build: phase times, denoiser calls and sample-evaluations per phase done by this run and
    taken from its cache (and what the naive protocol would have cost), solver statistics, the candidates' MSE (on
    the pick prompts) and value of the pick objective."""

    seconds: dict[str, float] = field(default_factory=dict)
    denoiser_evaluations: dict[str, int] = field(default_factory=dict)
    sample_evaluations: dict[str, int] = field(default_factory=dict)
    #: per phase, what the results this run took from its cache (calibration, sensitivity scores) cost when they
    #: were measured: part of the method's cost, not of this run's
    reused_denoiser_evaluations: dict[str, int] = field(default_factory=dict)
    reused_sample_evaluations: dict[str, int] = field(default_factory=dict)
    naive_sample_evaluations: int = 0
    activation_solver: list[dict[str, Any]] = field(default_factory=list)
    solver: list[dict[str, Any]] = field(default_factory=list)
    candidate_mse: list[float] = field(default_factory=list)
    #: each candidate's value of the pick objective (the mean MSE for ``"mse"``)
    candidate_score: list[float] = field(default_factory=list)
    chosen_k: float | None = None

    @property
    def method_sample_evaluations(self) -> int:
        """What the method cost, whether this run measured it or took it from its cache."""
        return sum(self.sample_evaluations.values()) + sum(self.reused_sample_evaluations.values())

    @property
    def reduction(self) -> float | None:
        """Naive sample-evaluations / the method's (cached results counted as measured: a rerun that reuses its
        cache is not cheaper *as a method*; the same calibration and final pick counted on both sides)."""
        ours = self.method_sample_evaluations
        return self.naive_sample_evaluations / ours if ours else None

    def count(self, phase: str, calls: int, samples: int, *, reused: tuple[int, int] = (0, 0)) -> None:
        """Record a phase's denoiser calls and sample-evaluations done by this run, and ``reused`` ``(calls,
        samples)``: what its results taken from the cache cost when they were measured."""
        self.denoiser_evaluations[phase] = calls
        self.sample_evaluations[phase] = samples
        if any(reused):
            self.reused_denoiser_evaluations[phase], self.reused_sample_evaluations[phase] = reused


def _as_list(values: Any) -> Any:
    """A sequence as a list; a lone string as it is (for the options check to refuse, not to split into letters)."""
    return values if isinstance(values, str) else list(values)


def run_pipeline(pipe, s: BuildSettings, indices: Sequence[int] | None = None) -> torch.Tensor:
    """Images of prompts ``indices`` (default all); prompt ``i`` always uses seed ``s.seed + i``."""
    from ..sampling import generate

    indices = range(len(s.prompts)) if indices is None else indices
    images, _ = generate(pipe, [s.prompts[i] for i in indices], [s.seed + i for i in indices], s.steps, s.guidance,
                         height=s.height, width=s.width, grad_mode=None, pipe_kwargs=s.pipe_kwargs)
    return images
