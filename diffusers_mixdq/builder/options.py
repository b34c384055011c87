"""What a build may be asked for, declared once: :class:`BuildOptions` (pydantic, ``extra="forbid"``).

Both ways of asking go through it: a recipe (:class:`~.recipe_options.RecipeOptions` extends it with where the
pipeline comes from and the weight budget) and :meth:`BuildSettings.validate <.settings.BuildSettings.validate>`
(the settings are laid out as the model's fields). A field it refuses comes back as one
:class:`~diffusers_mixdq.errors.MixDQError` that names the field the way the caller spelled it (``act_bits`` for
settings, ``activations.budget_bits`` in a recipe) and says what would be accepted.

Messages written here use ``<>`` for the failing field and ``<a.b>`` for the field at path ``a.b``; a
:class:`Labels` turns them into the caller's names.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Callable, Literal, Optional, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from ..errors import MixDQError
from .allocate import ALLOCATORS, DEFAULT_ALLOCATOR, PICK_OBJECTIVES

WEIGHT_WIDTHS = (2, 3, 4, 5, 6, 8)
ACTIVATION_WIDTHS = (4, 8)
ACTIVATION_MODES = ("int8", "dynamic", "dynamic-token", "none")
DEFAULT_CANDIDATES = {"content": [2, 4, 8], "quality": [4, 8]}
#: how the builder quantizes layer inputs unless told: one run-time range per token (ViDiT-Q), measured better than
#: static calibrated per-tensor ranges on both demo models (BENCHMARKS.md, "Ablation (issue 14)"); with
#: ``timestep_groups`` (static ranges per group) the mode falls back to static ``int8``. Plans always say which.
DEFAULT_ACTIVATION_MODE = "dynamic-token"
#: what the final pick among the ``k`` sweep's candidates minimises unless told: minus the mean per-image PSNR (the
#: mean MSE picked a plan 2.6 dB worse on scenes' test prompts under per-token activations; issue #14)
DEFAULT_PICK_OBJECTIVE = "psnr"
#: the refine stage's whole-plan evaluations when a build does not say (:mod:`.refine`; issue #14: it improved
#: every measured mixed plan on held-out prompts for under 2x the build time)
DEFAULT_REFINE_EVALUATIONS = 16
#: the content/quality split ratios ``k`` the builder sweeps by default: eleven (MixDQ's five, 0.5 to 2.0, measured
#: 0.77 dB worse on shapes (p = 0.013) and 0.8 dB worse on scenes' validation prompts; BENCHMARKS.md, issue #14)
DEFAULT_SPLIT_RATIOS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.7, 2.0)


def invalid(message: str) -> PydanticCustomError:
    """A validation error with our own message (``<>`` / ``<path>`` name fields, see the module docstring)."""
    return PydanticCustomError("mixdq", message)


def _widths(allowed: tuple[int, ...]) -> Callable[[Any], list]:
    words = ", ".join(map(str, allowed[:-1])) + f" and {allowed[-1]}"

    def check(value: Any) -> list:
        if not isinstance(value, (list, tuple)) or not value or any(w not in allowed for w in value):
            raise invalid(f"<> must be a non-empty list of {words}; got {value!r}.")
        return sorted(set(value))

    return check


def _fraction(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise invalid(f"<> must be a number in (0, 1], got {value!r}.")
    return float(value)


def _count(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise invalid(f"<> must be an integer of at least {minimum}, got {value!r}.")
        return value

    return check


def _ratios(value: Any) -> list[float]:
    if not isinstance(value, (list, tuple)) or not value or not all(
        isinstance(k, (int, float)) and not isinstance(k, bool) and k > 0 for k in value
    ):
        raise invalid(f"<> must be a non-empty list of positive numbers, got {value!r}.")
    return [float(k) for k in value]


def _alphas(value: Any) -> list[float]:
    if not isinstance(value, (list, tuple)) or not value or not all(
        isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1 for a in value
    ):
        raise invalid(f"<> must be a non-empty list of numbers in [0, 1], got {value!r}.")
    return [float(a) for a in value]


def _non_negative(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
        raise invalid(f"<> must be a finite number >= 0, got {value!r}.")
    return float(value)


def _positive(value: Any) -> float:
    if _non_negative(value) == 0:
        raise invalid(f"<> must be a positive number, got {value!r}.")
    return float(value)


def _allocator(value: Any) -> str:
    if value not in ALLOCATORS:
        raise invalid(f"<> must name a registered allocator ({', '.join(ALLOCATORS)}), got {value!r}; add one "
                      "with diffusers_mixdq.builder.allocate.ALLOCATORS.register.")
    return value


def not_held_out(prompts, pick_prompts) -> str | None:
    """Why ``pick_prompts`` (``<>``) are not held out from the calibration ``prompts``; ``None`` when they are."""
    shared = sorted(set(pick_prompts) & set(prompts))
    if not shared:
        return None
    return (f"<> must be held out from the calibration prompts; {len(shared)} of them are calibration prompts too "
            f"(first: {shared[0]!r}).")


def _outlier_fraction(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 0.5:
        raise invalid(f"<> must be a number in [0, 0.5] (0: off), got {value!r}.")
    return float(value)


def components_problem(o: Any) -> str | None:
    """What is wrong with the components / budget-scope options of ``o`` (a :class:`BuildOptions`), or ``None``."""
    if len(set(o.components)) != len(o.components):
        return f"<components> lists a component twice: {o.components}."
    if o.component_budgets and o.budget_scope != "per_component":
        return ("<component_budgets> are budgets per component; set <budget_scope> to per_component (a joint build "
                "has one budget for every component, the weight budget).")
    for name, bits in o.component_budgets.items():
        if name not in o.components:
            return f"<component_budgets> names {name!r}, which is not among <components> {o.components}."
        if not 1 <= bits <= 16:
            return f"<component_budgets>.{name} must be between 1 and 16 average bits, got {bits:g}."
    if len(o.components) < 2:
        return None
    if o.context == "uniform" or o.pick_uniform:
        return ("<context> 'uniform' and <pick_uniform> measure and pick the denoiser alone; with text-encoder "
                "<components> use context 'fp' and no pick_uniform.")
    if o.refine.evaluations:  # None (the default) is skipped there
        return ("<refine.evaluations> refines the denoiser's widths alone; with text-encoder <components> set it "
                "to 0 (off) or leave it out.")
    stages = [n for n, on in (("balance", o.balance), ("lowrank_rank", o.lowrank_rank),
                              ("distill_seconds", o.distill_seconds), ("weights.outlier_fraction",
                                                                       o.weights.outlier_fraction)) if on]
    if stages and o.budget_scope == "joint":
        return (f"<{stages[0]}> adds bits the denoiser's budget pays for; in a joint budget over several "
                "<components> that is not supported: set <budget_scope> to per_component.")
    return None


def _grouped(timestep_groups: Any) -> bool:
    """Whether ``timestep_groups`` asks for static ranges per group (more than one group)."""
    return isinstance(timestep_groups, int) and not isinstance(timestep_groups, bool) and timestep_groups > 1


def default_activation_mode(timestep_groups: Any = 0) -> str:
    """The activation mode a build uses when none is named: :data:`DEFAULT_ACTIVATION_MODE`, or static ``int8``
    with timestep groups (they are static ranges)."""
    return "int8" if _grouped(timestep_groups) else DEFAULT_ACTIVATION_MODE


def activation_defaults(mode: str, bits: int = 8) -> dict[str, str]:
    """A plan's activation keys for a build's activation ``mode`` (``int8``: static, ranges calibrated later)."""
    if mode == "none":
        return {"activations": "none"}
    return {"activations": f"int{bits}", **({} if mode == "int8" else {"act_range": mode})}


Fraction = Annotated[float, BeforeValidator(_fraction)]
Patterns = list[Annotated[str, Field(strict=True)]]


class Strict(BaseModel):
    """Unknown fields are errors, never ignored."""

    model_config = ConfigDict(extra="forbid")


class ActivationOptions(Strict):
    """How layer inputs are quantized: the mode, the candidate widths, the element-weighted average over quantized
    inputs (default: the widest candidate) and how many of the most activation-sensitive layers stay unquantized."""

    mode: Literal["int8", "dynamic", "dynamic-token", "none"] = DEFAULT_ACTIVATION_MODE
    candidates: Annotated[list[int], BeforeValidator(_widths(ACTIVATION_WIDTHS))] = [8]
    budget_bits: Optional[float] = None
    protect_most_sensitive: Annotated[int, BeforeValidator(_count(0))] = 0
    #: static ranges per group of the sampler's timesteps (0 or 1: one range, as before; needs mode int8)
    timestep_groups: Annotated[int, BeforeValidator(_count(0))] = 0

    @model_validator(mode="before")
    @classmethod
    def _mode_alone(cls, value: Any) -> Any:
        if isinstance(value, dict) and "mode" not in value and _grouped(value.get("timestep_groups")):
            return {**value, "mode": default_activation_mode(value["timestep_groups"])}
        return {"mode": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> "ActivationOptions":
        lo, hi = min(self.candidates), max(self.candidates)
        if self.budget_bits is not None and not lo <= self.budget_bits <= hi:
            raise invalid(f"<activations.budget_bits> must be between {lo} and {hi} (what the activation candidates "
                          f"{self.candidates} can average), got {self.budget_bits:g}.")
        if self.mode == "none" and (self.protect_most_sensitive or self.budget_bits is not None):
            raise invalid("<activations.budget_bits> / <activations.protect_most_sensitive> need quantized "
                          "activations; set <activations.mode> to int8 or dynamic.")
        if self.timestep_groups > 1 and self.mode != "int8":
            raise invalid(f"<activations.timestep_groups> are static ranges per timestep group; they need "
                          f"<activations.mode> int8 (static, calibrated), not {self.mode}.")
        return self


WeightWidths = Annotated[list[int], BeforeValidator(_widths(WEIGHT_WIDTHS))]


class WeightOptions(Strict):
    """Candidate weight widths per group (a group left out keeps its default)."""

    candidates: dict[Literal["content", "quality"], WeightWidths] = DEFAULT_CANDIDATES
    #: share of each int4 / int2 layer's output channels (highest kurtosis) kept at int8 too (0: off)
    outlier_fraction: Annotated[float, BeforeValidator(_outlier_fraction)] = 0.0
    #: the candidate widths measured (``None``: all); the others are estimated from them (builder.width_ladder)
    measure: Optional[WeightWidths] = None

    @model_validator(mode="after")
    def _with_defaults(self) -> "WeightOptions":
        self.candidates = {g: list(w) for g, w in {**DEFAULT_CANDIDATES, **self.candidates}.items()}
        return self


class SensitivityFile(Strict):
    """Scores measured elsewhere (:mod:`.published`): a MixDQ log or an earlier build's score cache."""

    path: str
    widths: WeightWidths = [2, 4, 8]
    prefix: str = "model."


class RefineOptions(Strict):
    """The refine stage (:mod:`.refine`): whole-plan evaluations on the pick prompts (0: off; ``None``, the
    default: :data:`DEFAULT_REFINE_EVALUATIONS`, skipped with text-encoder ``components``), in-plan measuring
    rounds, and the objective (``None``: ``pick_objective``)."""

    evaluations: Optional[Annotated[int, BeforeValidator(_count(0))]] = None
    rounds: Annotated[int, BeforeValidator(_count(1))] = 1
    objective: Optional[Literal[PICK_OBJECTIVES]] = None
    #: a proposal is kept when its paired per-image improvement exceeds this many standard errors (0: any gain)
    significance: Annotated[float, BeforeValidator(_non_negative)] = 2.0
    #: reject a proposal that adds a diverged image or worsens the tail by ``significance`` (:mod:`.refine_guard`)
    guard: Annotated[bool, Field(strict=True)] = True


class BuildOptions(Strict):
    """Every option a build takes from its caller, with its rules (see the module docstring)."""

    component: Optional[str] = None
    steps: Annotated[int, BeforeValidator(_count(1))] = 4
    guidance: float = 1.0
    height: Optional[int] = None
    width: Optional[int] = None
    seed: Annotated[int, BeforeValidator(_count(0))] = 0
    weights: WeightOptions = WeightOptions()
    activations: ActivationOptions = ActivationOptions()
    protected: Patterns = []
    content_patterns: Optional[Patterns] = None
    split_ratios: Annotated[list[float], BeforeValidator(_ratios)] = list(DEFAULT_SPLIT_RATIOS)
    budget_mode: Literal["at_most", "band"] = "at_most"
    sweep_fraction: Fraction = 0.25
    content_fraction: Fraction = 0.5
    device: Optional[str] = None
    allocator: Annotated[str, BeforeValidator(_allocator)] = DEFAULT_ALLOCATOR
    sensitivity_files: list[SensitivityFile] = []
    pipe_kwargs: dict[str, Any] = {}
    #: the final pick: held-out prompts (empty: the calibration prompts) and what it minimises (:mod:`.assign`)
    pick_prompts: list[Annotated[str, Field(strict=True)]] = []
    pick_objective: Literal[PICK_OBJECTIVES] = DEFAULT_PICK_OBJECTIVE
    protect_first_last: Annotated[bool, Field(strict=True)] = False
    #: the correct stage (:mod:`.correct`): channel balancing and low-rank branches
    balance: Annotated[bool, Field(strict=True)] = False
    balance_alphas: Annotated[list[float], BeforeValidator(_alphas)] = [0.0, 0.25, 0.5, 0.75]
    lowrank_rank: Annotated[int, BeforeValidator(_count(0))] = 0
    lowrank_layers: Patterns = []
    #: the distill stage (:mod:`.distill`)
    distill_seconds: Annotated[float, BeforeValidator(_non_negative)] = 0.0
    distill_rank: Annotated[int, BeforeValidator(_count(1))] = 4
    distill_lr: Annotated[float, BeforeValidator(_positive)] = 1e-3
    distill_relation: Annotated[float, BeforeValidator(_non_negative)] = 1.0
    #: where sensitivities are measured and whether the uniform plan joins the pick (:mod:`.uniform_context`)
    context: Literal["fp", "uniform"] = "fp"
    pick_uniform: Annotated[bool, Field(strict=True)] = False
    #: what scores content layers: SSIM (MixDQ) or minus the mean per-image MSE to full precision
    content_metric: Literal["ssim", "mse"] = "ssim"
    #: pipeline components to build plans for (empty: the denoiser alone) and how their budget is shared
    #: (:mod:`.text_encoders`, :mod:`.plan_set`)
    components: list[Annotated[str, Field(strict=True)]] = []
    budget_scope: Literal["joint", "per_component"] = "joint"
    component_budgets: dict[str, float] = {}
    text_encoder_widths: WeightWidths = [4, 8]
    #: the refine stage after the pick (:mod:`.refine`)
    refine: RefineOptions = RefineOptions()

    @model_validator(mode="after")
    def _components(self) -> "BuildOptions":
        message = components_problem(self)
        if message:
            raise invalid(message)
        return self

    @model_validator(mode="after")
    def _uniform_width(self) -> "BuildOptions":
        if (self.context == "uniform" or self.pick_uniform) and not set.intersection(
                *(set(w) for w in self.weights.candidates.values())):
            raise invalid("<context> 'uniform' and <pick_uniform> need a width every group of "
                          f"<weights.candidates> has (the uniform plan's); got {self.weights.candidates}.")
        if self.context == "uniform" and self.sensitivity_files:
            raise invalid("<sensitivity_files> were measured in full precision; leave them out with <context> "
                          "'uniform' (or use context 'fp').")
        return self


Loc = tuple


class Labels:
    """How a caller spells fields: ``names`` maps a path (or its first two parts) to a name; other paths are
    ``quote(path)``."""

    def __init__(self, names: dict[Loc, str], quote: Callable[[Loc], str]):
        self.names, self.quote = names, quote

    def __call__(self, loc: Loc) -> str:
        loc = tuple(p for p in loc if p != "[key]")
        for n in (len(loc), 2):
            if loc[:n] in self.names:
                return ".".join([self.names[loc[:n]], *map(str, loc[n:])])
        return self.quote(loc)

    def render(self, message: str, loc: Loc) -> str:
        return re.sub(r"<([\w.]*)>", lambda m: self(tuple(m.group(1).split(".")) if m.group(1) else loc), message)


def _known_fields(model: type[BaseModel], loc: Loc) -> list[str]:
    for key in loc:
        if isinstance(key, int):  # an item of a list of models
            continue
        annotation = model.model_fields[key].annotation
        model = next(t for t in (annotation, *get_args(annotation)) if isinstance(t, type) and issubclass(t, BaseModel))
    return sorted(model.model_fields)


def error_from(e: ValidationError, model: type[BaseModel], labels: Labels, prefix: str = "",
               first: tuple[str, ...] = ()) -> MixDQError:
    """One :class:`MixDQError` for the first problem pydantic found (all unknown fields of one mapping together;
    problems with the fields named in ``first`` before the others)."""
    errors = sorted(e.errors(include_url=False), key=lambda err: not (err["loc"] and err["loc"][0] in first))
    extra = [err for err in errors if err["type"] == "extra_forbidden"]
    if extra:
        parent = extra[0]["loc"][:-1]
        given = sorted(str(err["loc"][-1]) for err in extra if err["loc"][:-1] == parent)
        known = _known_fields(model, parent)
        if not parent:
            return MixDQError(f"{prefix}unknown field(s) {given}; known fields are {known}.")
        return MixDQError(f"{prefix}{labels(parent)} takes {known}; got {given}.")
    err = errors[0]
    loc = err["loc"]
    if err["type"] == "mixdq":
        return MixDQError(prefix + labels.render(err["msg"], loc))
    if err["type"] == "literal_error":
        return MixDQError(f"{prefix}{labels(loc)} must be {err['ctx']['expected']}, got {err['input']!r}.")
    return MixDQError(f"{prefix}{labels(loc)}: {err['msg'].lower()}, got {err['input']!r}.")
