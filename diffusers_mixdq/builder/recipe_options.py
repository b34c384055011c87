"""A recipe's fields as a model: :class:`BuildOptions` plus where the pipeline comes from, the prompts and the
weight budget (the YAML layout is in :mod:`.recipe`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BeforeValidator, Field, StrictStr, ValidationError, ValidationInfo, model_validator

from .options import (ActivationOptions, BuildOptions, Labels, Strict, WeightOptions, _count, error_from, invalid,
                      not_held_out)
from .prompts import BUILTIN_PROMPTS


def _pipeline(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise invalid("needs 'pipeline': a local pipeline directory or a Hub repo id.")
    return value


def calibrate_only(candidates: dict[str, list[int]], activations: ActivationOptions) -> bool:
    """Whether there is no decision to make: one weight width everywhere, activations fixed (no sweep needed)."""
    widths = {w for ws in candidates.values() for w in ws}
    acts = activations
    acts_fixed = acts.mode == "none" or (len(set(acts.candidates)) == 1 and not acts.protect_most_sensitive)
    return len(widths) == 1 and acts_fixed


class RecipeWeights(WeightOptions):
    """The weight budget: ``budget_bits`` (parameter-weighted average) or ``size_mb`` (MiB of quantizable weights)."""

    budget_bits: Optional[float] = None
    size_mb: Optional[float] = None

    @model_validator(mode="after")
    def _one_budget(self) -> "RecipeWeights":
        if (self.budget_bits is None) == (self.size_mb is None):
            raise invalid("give exactly one of <weights.budget_bits> (average bits) and <weights.size_mb>.")
        if self.budget_bits is not None and not 1 <= self.budget_bits <= 16:
            raise invalid(f"<weights.budget_bits> must be between 1 and 16, got {self.budget_bits:g}.")
        if self.size_mb is not None and self.size_mb <= 0:
            raise invalid("<weights.size_mb> must be positive.")
        return self


class PushOptions(Strict):
    repo_id: StrictStr
    private: bool = False


class RecipeOptions(BuildOptions):
    """Every field of a recipe file, validated once."""

    pipeline: Annotated[str, BeforeValidator(_pipeline)] = Field(None, validate_default=True)
    revision: Optional[str] = None
    description: Any = None
    torch_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    prompts: Any = "builtin"
    num_prompts: Optional[Annotated[int, BeforeValidator(_count(0))]] = None
    resolution: Optional[int] = None
    weights: RecipeWeights = Field(default_factory=dict, validate_default=True)
    push: Optional[PushOptions] = None
    #: like ``prompts``: a .txt file or a list (default: none, the pick uses the calibration prompts)
    pick_prompts: Any = []

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> "RecipeOptions":
        if self.resolution is not None:
            self.height = self.height if "height" in self.model_fields_set else self.resolution
            self.width = self.width if "width" in self.model_fields_set else self.resolution
        base = (info.context or {}).get("base", Path.cwd())
        self.prompts = _prompts(self.prompts, base)[: self.num_prompts]
        for entry in self.sensitivity_files:  # relative to the recipe file, like a prompts file
            entry.path = str(Path(base) / entry.path) if not Path(entry.path).is_absolute() else entry.path
        if not self.prompts:
            raise invalid("has no prompts.")
        self.pick_prompts = _prompts(self.pick_prompts, base, "pick_prompts") if self.pick_prompts else []
        message = not_held_out(self.prompts, self.pick_prompts)
        if message:
            raise invalid(message.replace("<>", "'pick_prompts'"))
        if len(self.components) > 1 and calibrate_only(self.weights.candidates, self.activations):
            raise invalid("<components> with text encoders need a mixed build; a calibrate-only recipe (one weight "
                          "width, fixed activations) builds the denoiser alone.")
        if self.weights.size_mb is not None and self.budget_scope == "per_component":
            raise invalid("<weights.size_mb> is one size for every component; with <budget_scope> per_component "
                          "give <weights.budget_bits> (and <component_budgets>).")
        budget = self.weights.budget_bits
        if calibrate_only(self.weights.candidates, self.activations) and budget is not None:
            width = next(iter({w for ws in self.weights.candidates.values() for w in ws}))
            if abs(budget - width) > 1e-9 and not (self.protected or self.protect_first_last):
                raise invalid(f"all candidates are {width}-bit, so <weights.budget_bits> must be {width}.")
        return self


def _prompts(prompts: Any, base: Path, key: str = "prompts") -> list[str]:
    if prompts == "builtin" and key == "prompts":
        return list(BUILTIN_PROMPTS)
    if isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts):
        return list(prompts)
    if isinstance(prompts, str):
        file = (base / prompts) if not Path(prompts).is_absolute() else Path(prompts)
        if not file.is_file():
            raise invalid(f"'{key}' names '{prompts}', which is neither 'builtin' nor a file." if key == "prompts" else
                          f"'{key}' names '{prompts}', which is not a file.")
        return [line.strip() for line in file.read_text().splitlines() if line.strip()]
    builtin = "'builtin', " if key == "prompts" else ""
    raise invalid(f"'{key}' must be {builtin}a text file (one prompt per line) or a list of strings.")


#: a recipe names top-level fields in quotes and nested ones by their path
RECIPE_LABELS = Labels({("activations", "mode"): "'activations' (mode)"},
                       lambda loc: f"'{loc[0]}'" if len(loc) == 1 else ".".join(map(str, loc)))


def parse_recipe(data: dict, where: str, base: Path) -> RecipeOptions:
    """``data`` validated as a recipe (``base``: where relative prompt files are); one MixDQError on a bad field."""
    try:
        return RecipeOptions.model_validate(data, context={"base": base})
    except ValidationError as e:
        raise error_from(e, RecipeOptions, RECIPE_LABELS, prefix=f"Recipe {where}: ", first=("pipeline",)) from None
