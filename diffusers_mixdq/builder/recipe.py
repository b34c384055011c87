"""Recipes: what ``mixdq build`` builds, as a YAML file (``hub_recipes/`` holds ready ones).

```yaml
pipeline: stabilityai/sd-turbo     # local pipeline directory or Hub repo id
revision: null                     # Hub revision of the pipeline
component: unet                    # denoiser component (default: unet, else transformer)
torch_dtype: float32               # dtype the pipeline runs in during the build
prompts: builtin                   # "builtin" (32 generic prompts), a .txt file (one per line), or a list
num_prompts: 32
steps: 1
guidance: 0.0
resolution: 512                    # or height: / width:
seed: 0
weights:
  budget_bits: 4.0                 # parameter-weighted average (protected layers count 16) ...
  # size_mb: 900                   # ... or a target size of the denoiser's quantizable weights in MiB (2**20 B)
  candidates: {content: [2, 4, 8], quality: [4, 8]}
activations: dynamic-token         # the default: a run-time range per token | int8 (static per-tensor ranges,
                                   # calibrated; the default before issue #14) | dynamic (per tensor) | none,
                                   # or a mapping (with timestep_groups and no mode: int8):
# activations: {mode: int8, candidates: [4, 8], budget_bits: 7.0, protect_most_sensitive: 7, timestep_groups: 4}
# weights: {..., outlier_fraction: 0.05}   # int8 copy of the 5% highest-kurtosis rows of int2...int6 layers
# weights: {candidates: {content: [2, 3, 4, 5, 6, 8], quality: [3, 4, 5, 6, 8]}, measure: [2, 4, 8]}
#   int3/int5/int6 need the native weight backend (picked automatically); measure: the widths measured, the
#   rest estimated (noise power 4x per bit, builder.width_ladder), so the finer ladder costs no more sweeps
protected: [conv_in, conv_out]     # kept in floating point (each pattern must match a layer)
content_patterns: ["*attn2.*", "*.ff.*"]   # default: the denoiser family's (diffusers_mixdq.families)
split_ratios: [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.7, 2.0]   # k = content / quality width
sweep_fraction: 0.25               # share of each recorded call's samples a quality-layer measurement replays
content_fraction: 0.5              # share of the prompts a content-layer measurement generates (at least 4)
device: null                       # cuda, cuda:1, cpu (default: cpu; sharded CUDA builds use one GPU per process)
allocator: highs                   # how widths are chosen (diffusers_mixdq.builder.allocate.ALLOCATORS)
pipe_kwargs: {}                    # extra arguments of every pipeline call, e.g. {use_resolution_binning: false}
sensitivity_files: []              # weight scores measured elsewhere, not measured again (builder.published):
# - {path: sensitivity_log/weight/ssim/sensitivity.yaml, widths: [2, 4, 8], prefix: "model."}   # MixDQ's logs
pick_prompts: validation.txt       # held-out prompts the final pick of k generates on (default: the calibration
                                   # prompts); a .txt file or a list, none of them among the calibration prompts
pick_objective: psnr               # the default: psnr (mean per-image PSNR) | mse (mean per-image MSE to FP,
                                   # the default before issue #14) | tail (mean of the worst 10% of images)
protect_first_last: false          # also keep the family's first/last layers (e.g. conv_in, conv_out) in 16 bit
balance: false                     # channel balancing (ViDiT-Q), alpha per layer from balance_alphas
balance_alphas: [0.0, 0.25, 0.5, 0.75]
lowrank_rank: 0                    # low-rank branch (SVDQuant) of this rank per layer with quantized weights
lowrank_layers: []                 # patterns of the layers that get one (default: all)
distill_seconds: 0                 # > 0: train adapters (rank distill_rank) against FP for this long (MPQ-DM TRD)
distill_rank: 4
distill_lr: 0.001
distill_relation: 1.0              # weight of the last block's relation KL beside the output MSE
context: fp                        # measure each layer with the rest in full precision (fp, MixDQ) or at the
                                   # uniform base width, e.g. int4 (uniform: sees how errors compound)
pick_uniform: false                # the same-size uniform plan joins the final pick (never worse than it there)
content_metric: ssim               # scores content layers: ssim (MixDQ) | mse (minus the mean per-image MSE to FP)
components: [unet, text_encoder]   # plans for these components (default: the denoiser alone): the denoiser and
                                   # text encoders (text_encoder, text_encoder_2, ...), one folder each in OUT
budget_scope: joint                # joint: one budget (weights.budget_bits / size_mb) over every component's layers |
                                   # per_component: each its own (component_budgets, else weights.budget_bits)
component_budgets: {text_encoder: 8.0}   # per_component only: average bits of a component
text_encoder_widths: [4, 8]        # candidate weight widths of text-encoder layers (weight-only; scored like content
                                   # layers, by the images: builder.text_encoders)
refine: {evaluations: 0, rounds: 1, objective: null, significance: 2.0, guard: true}   # default 16 evaluations (0: off;
                                   # left out with text-encoder components: skipped, as 0 is here): after the pick,
                                   # improve the widths by the measured image error of whole plans on the pick
                                   # prompts (builder.refine; objective psnr | tail | mse, default pick_objective;
                                   # kept when the paired per-image gain exceeds `significance` standard errors;
                                   # guard: and it adds no image below 20 dB, worsens the tail less: refine_guard)
push: {repo_id: you/sd-turbo-mixdq-w4a8, private: false}   # optional, or `mixdq build --push`
```

A recipe whose candidates are all one width (e.g. W8A8: ``candidates: {content: [8], quality: [8]}``) needs no
sensitivity sweep: it is calibrated only.

Every field is checked by one declarative model (:class:`~.recipe_options.RecipeOptions`, which extends the
builder's :class:`~.options.BuildOptions`); a bad field is one :class:`~diffusers_mixdq.errors.MixDQError` naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MixDQError
from .allocate import DEFAULT_ALLOCATOR
from .options import (DEFAULT_ACTIVATION_MODE, DEFAULT_CANDIDATES, DEFAULT_PICK_OBJECTIVE, DEFAULT_SPLIT_RATIOS,
                      ActivationOptions, activation_defaults)
from .prompts import BUILTIN_PROMPTS
from .recipe_options import RecipeOptions, calibrate_only, parse_recipe
from .settings import BuildSettings
from .stage_settings import StageSettings

__all__ = ["BUILTIN_PROMPTS", "Recipe", "load_recipe", "run_recipe"]


@dataclass
class Recipe(StageSettings):
    """A validated recipe (see the module docstring for the YAML layout)."""

    pipeline: str
    revision: str | None = None
    component: str | None = None
    torch_dtype: str = "float32"
    prompts: list[str] = field(default_factory=list)
    steps: int = 4
    guidance: float = 1.0
    height: int | None = None
    width: int | None = None
    seed: int = 0
    budget_bits: float | None = None
    size_mb: float | None = None
    candidates: dict[str, list[int]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_CANDIDATES.items()})
    activations: str = DEFAULT_ACTIVATION_MODE
    act_candidates: list[int] = field(default_factory=lambda: [8])
    act_budget_bits: float | None = None
    act_protect: int = 0
    sweep_fraction: float = 0.25
    content_fraction: float = 0.5
    device: str | None = None
    protected: list[str] = field(default_factory=list)
    #: ``None``: the denoiser family's content patterns (:func:`diffusers_mixdq.families.family_of`)
    content_patterns: list[str] | None = None
    split_ratios: list[float] = field(default_factory=lambda: list(DEFAULT_SPLIT_RATIOS))
    budget_mode: str = "at_most"
    allocator: str = DEFAULT_ALLOCATOR
    sensitivity_files: list = field(default_factory=list)
    pipe_kwargs: dict = field(default_factory=dict)
    pick_prompts: list[str] = field(default_factory=list)
    pick_objective: str = DEFAULT_PICK_OBJECTIVE
    protect_first_last: bool = False
    components: list[str] = field(default_factory=list)
    budget_scope: str = "joint"
    component_budgets: dict[str, float] = field(default_factory=dict)
    text_encoder_widths: list[int] = field(default_factory=lambda: [4, 8])
    push: dict[str, Any] | None = None
    description: str | None = None
    source: str | None = None

    @classmethod
    def from_options(cls, o: RecipeOptions, source: str | None) -> "Recipe":
        a = o.activations
        return cls(
            pipeline=o.pipeline, revision=o.revision, component=o.component, torch_dtype=o.torch_dtype,
            prompts=list(o.prompts), steps=o.steps, guidance=float(o.guidance), height=o.height, width=o.width,
            seed=o.seed, budget_bits=o.weights.budget_bits, size_mb=o.weights.size_mb,
            candidates=dict(o.weights.candidates), activations=a.mode, act_candidates=list(a.candidates),
            act_budget_bits=a.budget_bits, act_protect=a.protect_most_sensitive, sweep_fraction=o.sweep_fraction,
            content_fraction=o.content_fraction, device=o.device, protected=list(o.protected),
            content_patterns=None if o.content_patterns is None else list(o.content_patterns),
            split_ratios=list(o.split_ratios), budget_mode=o.budget_mode, allocator=o.allocator,
            sensitivity_files=[f.model_dump() for f in o.sensitivity_files], pick_prompts=list(o.pick_prompts),
            pipe_kwargs=dict(o.pipe_kwargs),
            pick_objective=o.pick_objective, protect_first_last=o.protect_first_last, balance=o.balance,
            balance_alphas=list(o.balance_alphas), lowrank_rank=o.lowrank_rank, lowrank_layers=list(o.lowrank_layers),
            distill_seconds=o.distill_seconds, distill_rank=o.distill_rank, distill_lr=o.distill_lr,
            distill_relation=o.distill_relation, act_timestep_groups=a.timestep_groups,
            outlier_fraction=o.weights.outlier_fraction, measure_widths=o.weights.measure,
            context=o.context,
            pick_uniform=o.pick_uniform, content_metric=o.content_metric, components=list(o.components),
            budget_scope=o.budget_scope, component_budgets=dict(o.component_budgets),
            text_encoder_widths=list(o.text_encoder_widths), refine_evaluations=o.refine.evaluations,
            refine_rounds=o.refine.rounds, refine_objective=o.refine.objective,
            refine_significance=o.refine.significance, refine_guard=o.refine.guard,
            push=o.push.model_dump() if o.push is not None else None, description=o.description, source=source,
        )

    @property
    def calibrate_only(self) -> bool:
        acts = ActivationOptions.model_construct(mode=self.activations, candidates=self.act_candidates,
                                                 protect_most_sensitive=self.act_protect)
        return calibrate_only(self.candidates, acts)

    def settings(self) -> BuildSettings:
        """The builder's :class:`~diffusers_mixdq.builder.BuildSettings` for this recipe (budget in bits)."""
        return BuildSettings(
            prompts=self.prompts, weight_bits=self.budget_bits if self.budget_bits is not None else 0.0,
            activations=self.activations, steps=self.steps, guidance=self.guidance, height=self.height,
            width=self.width, seed=self.seed, widths={k: list(v) for k, v in self.candidates.items()},
            content_patterns=None if self.content_patterns is None else tuple(self.content_patterns),
            protected=tuple(self.protected), split_ratios=tuple(self.split_ratios), budget_mode=self.budget_mode,
            sweep_fraction=self.sweep_fraction, content_fraction=self.content_fraction,
            act_widths=list(self.act_candidates), act_bits=self.act_budget_bits, act_protect=self.act_protect,
            device=self.device, allocator=self.allocator, sensitivity_files=[dict(f) for f in self.sensitivity_files],
            pipe_kwargs=dict(self.pipe_kwargs),
            pick_prompts=list(self.pick_prompts), pick_objective=self.pick_objective,
            protect_first_last=self.protect_first_last, components=list(self.components),
            budget_scope=self.budget_scope, component_budgets=dict(self.component_budgets),
            text_encoder_widths=list(self.text_encoder_widths), **self.stage_values(),
        )


def load_recipe(source: str | os.PathLike | dict) -> Recipe:
    """Read and validate a recipe from a YAML file or a dict. Raises :class:`MixDQError` naming the bad field."""
    import yaml

    where, base, data = "<dict>", Path.cwd(), source
    if not isinstance(source, dict):
        path = Path(source)
        where, base = f"'{path}'", path.parent
        if not path.is_file():
            raise MixDQError(f"No recipe file at '{path}'.")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise MixDQError(f"Recipe {where}: is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise MixDQError(f"Recipe {where}: must be a mapping of fields (see diffusers_mixdq.builder.recipe).")
    options = parse_recipe(dict(data), where, base)
    return Recipe.from_options(options, None if isinstance(source, dict) else str(source))


def run_recipe(recipe: Recipe, out: str | os.PathLike, progress: bool = True, cache_dir: str | None = None):
    """Build the recipe's plan and save it as ``out/<component>/plan.json`` (the Hub plan-repo layout); with
    text encoders among ``components``, a plan set: ``out/<component>/plan.json`` for each.

    The full-precision calibration run and the sensitivity scores are cached in ``cache_dir`` (default
    ``out/.sensitivity-cache``) as they are measured, so a build that was interrupted resumes where it stopped and
    gives the same plan.

    Returns ``(plan, plan_path, report)`` of the denoiser; ``report`` is ``None`` for calibrate-only recipes. A plan
    set's other plans are in ``plan.provenance["components"]``'s folders beside ``plan_path``.
    """
    from ..families import denoiser_of
    from .distributed import is_main_process

    pipe = _load_pipeline(recipe)
    component, denoiser = denoiser_of(pipe, recipe.component)
    settings = recipe.settings()
    settings.component = component
    settings.cache_dir = str(cache_dir if cache_dir is not None else Path(out) / ".sensitivity-cache")
    if recipe.size_mb is not None:
        settings.weight_bits = recipe.size_mb * 8 * 2**20 / _quantizable(pipe, denoiser, settings.components)
    plans, report = _build(recipe, pipe, denoiser, settings, progress)
    for plan in plans.values():
        plan.target["base_model"] = recipe.pipeline
        plan.target["revision"] = recipe.revision
        plan.provenance["recipe"] = {
            "source": recipe.source,
            "description": recipe.description,
            "pipeline": recipe.pipeline,
            "pipeline_is_local": Path(recipe.pipeline).exists(),  # a local directory is no Hub base_model
            "steps": recipe.steps,
            "guidance": recipe.guidance,
            "budget_bits": settings.weight_bits,
            "size_mb": recipe.size_mb,
            "activations": recipe.activations,
        }
    path = Path(out) / component / "plan.json"
    if is_main_process():  # in a sharded build every process ends with the same plan; one writes it
        for name, plan in plans.items():
            saved = plan.save(Path(out) / name)
            path = saved if name == component else path
    return plans[component], path, report


def _quantizable(pipe, denoiser, components) -> int:
    """Parameters of the quantizable layers a size budget covers: the denoiser's, and the other components'."""
    from ..plan import layer_table

    models = [denoiser] + [getattr(pipe, c) for c in components if getattr(pipe, c, None) is not denoiser
                           and getattr(pipe, c, None) is not None]
    return sum(info.numel for model in models for info in layer_table(model).values())


def _build(recipe: Recipe, pipe, denoiser, settings: BuildSettings, progress: bool):
    """``({component: plan}, report)``: a calibrate-only plan, a mixed plan, or a plan set."""
    from ..plan import layer_table
    from .builder import calibrated_plan
    from .context import protected_layers
    from .plan_set import build_plan_set

    if recipe.calibrate_only:
        protected = settings.for_model(denoiser).protected
        protected_layers(protected, layer_table(denoiser), type(denoiser).__name__)  # same check as a mixed build
        plan = calibrated_plan(pipe, _uniform_plan(recipe, protected), settings, progress=progress)
        return {settings.component: plan}, None
    return build_plan_set(pipe, settings, progress=progress)


def _load_pipeline(recipe: Recipe):
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    dtype = getattr(torch, recipe.torch_dtype)
    try:
        pipe = DiffusionPipeline.from_pretrained(recipe.pipeline, revision=recipe.revision, dtype=dtype)
    except (OSError, ValueError) as e:
        raise MixDQError(f"Could not load the recipe's pipeline '{recipe.pipeline}': {e}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _uniform_plan(recipe: Recipe, protected):
    """The plan of a calibrate-only recipe: its one weight width everywhere, its activations, the ``protected``
    layers (the recipe's, and the family's first/last with ``protect_first_last``) in floating point (ranges are
    calibrated afterwards)."""
    from ..plan import BitPlan

    width = next(iter({w for ws in recipe.candidates.values() for w in ws}))
    acts = activation_defaults(recipe.activations, recipe.act_candidates[0])
    return BitPlan(defaults={"weights": f"int{width}", **acts}, ignore=list(protected))
