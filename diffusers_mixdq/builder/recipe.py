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
  # size_mb: 900                   # ... or a target size of the denoiser's quantizable weights in MB
  candidates: {content: [2, 4, 8], quality: [4, 8]}
activations: int8                  # int8 (static, calibrated) | dynamic | none, or a mapping:
# activations: {mode: int8, candidates: [4, 8], budget_bits: 7.0, protect_most_sensitive: 7}
protected: [conv_in, conv_out]     # kept in floating point
content_patterns: ["*attn2.*", "*.ff.*"]
split_ratios: [0.5, 0.75, 1.0, 1.5, 2.0]
sweep_fraction: 0.25               # share of each recorded call's samples a quality-layer measurement replays
content_fraction: 0.5              # share of the prompts a content-layer measurement generates (at least 4)
device: null                       # cuda, cuda:1, cpu (default: cpu; sharded CUDA builds use one GPU per process)
push: {repo_id: you/sd-turbo-mixdq-w4a8, private: false}   # optional, or `mixdq build --push`
```

A recipe whose candidates are all one width (e.g. W8A8: ``candidates: {content: [8], quality: [8]}``) needs no
sensitivity sweep: it is calibrated only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MixDQError

#: generic calibration prompts (our own; MixDQ calibrates on 32 COCO captions)
BUILTIN_PROMPTS = [
    "a photo of a cat sitting on a wooden windowsill",
    "a red double-decker bus driving down a city street",
    "a bowl of fresh fruit on a kitchen table",
    "a man riding a surfboard on a large wave",
    "a snowy mountain landscape at sunrise",
    "two dogs playing with a frisbee in a park",
    "a plate of pasta with tomato sauce and basil",
    "an old lighthouse on a rocky coast under storm clouds",
    "a living room with a grey sofa and a large window",
    "a child flying a kite on a sunny beach",
    "a vintage car parked in front of a brick building",
    "a close-up photo of a sunflower with a bee",
    "a train crossing a stone bridge in the countryside",
    "a watercolor painting of a village by a river",
    "a cup of coffee next to an open book",
    "a giraffe standing next to a tall tree",
    "a busy market street with colorful umbrellas",
    "a person skiing down a steep slope",
    "a bicycle leaning against a yellow wall",
    "a futuristic city skyline at night with neon lights",
    "a bird perched on a branch covered in snow",
    "a sailboat on a calm lake at sunset",
    "a pizza with mushrooms and olives on a wooden board",
    "an astronaut floating above the earth",
    "a herd of elephants walking across a dry savanna",
    "a cozy cabin in a pine forest in winter",
    "a teddy bear sitting on a bed",
    "a bridge over a river in a big city at dusk",
    "a tennis player hitting a ball on a clay court",
    "a portrait of an old man with a white beard",
    "a field of tulips with a windmill in the background",
    "a laptop and a smartphone on a desk",
]

_KEYS = {
    "pipeline", "revision", "component", "torch_dtype", "prompts", "num_prompts", "steps", "guidance",
    "resolution", "height", "width", "seed", "weights", "activations", "protected", "content_patterns",
    "split_ratios", "budget_mode", "push", "description", "sweep_fraction", "content_fraction",
    "device",
}
_ACTIVATION_KEYS = {"mode", "candidates", "budget_bits", "protect_most_sensitive"}


@dataclass
class Recipe:
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
    candidates: dict[str, list[int]] = field(default_factory=lambda: {"content": [2, 4, 8], "quality": [4, 8]})
    activations: str = "int8"
    act_candidates: list[int] = field(default_factory=lambda: [8])
    act_budget_bits: float | None = None
    act_protect: int = 0
    sweep_fraction: float = 0.25
    content_fraction: float = 0.5
    device: str | None = None
    protected: list[str] = field(default_factory=list)
    content_patterns: list[str] = field(default_factory=lambda: ["*attn2.*", "*.ff.*"])
    split_ratios: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.5, 2.0])
    budget_mode: str = "at_most"
    push: dict[str, Any] | None = None
    description: str | None = None
    source: str | None = None

    @property
    def calibrate_only(self) -> bool:
        widths = {w for ws in self.candidates.values() for w in ws}
        acts_fixed = self.activations == "none" or (len(set(self.act_candidates)) == 1 and not self.act_protect)
        return len(widths) == 1 and acts_fixed

    def settings(self):
        """The builder's :class:`~diffusers_mixdq.builder.BuildSettings` for this recipe (budget in bits)."""
        from .builder import BuildSettings

        return BuildSettings(
            prompts=self.prompts, weight_bits=self.budget_bits if self.budget_bits is not None else 0.0,
            activations=self.activations, steps=self.steps, guidance=self.guidance, height=self.height,
            width=self.width, seed=self.seed, widths={k: list(v) for k, v in self.candidates.items()},
            content_patterns=tuple(self.content_patterns), protected=tuple(self.protected),
            split_ratios=tuple(self.split_ratios), budget_mode=self.budget_mode, sweep_fraction=self.sweep_fraction,
            content_fraction=self.content_fraction,
            act_widths=list(self.act_candidates), act_bits=self.act_budget_bits, act_protect=self.act_protect,
            device=self.device,
        )


def _fail(where: str, problem: str) -> MixDQError:
    return MixDQError(f"Recipe {where}: {problem}")


def load_recipe(source: str | os.PathLike | dict) -> Recipe:
    """Read and validate a recipe from a YAML file or a dict. Raises :class:`MixDQError` naming the bad field."""
    import yaml

    where = "<dict>"
    base = Path.cwd()
    if isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        where = f"'{path}'"
        if not path.is_file():
            raise MixDQError(f"No recipe file at '{path}'.")
        base = path.parent
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise _fail(where, f"is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise _fail(where, "must be a mapping of fields (see diffusers_mixdq.builder.recipe).")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise _fail(where, f"unknown field(s) {unknown}; known fields are {sorted(_KEYS)}.")
    if not isinstance(data.get("pipeline"), str) or not data["pipeline"]:
        raise _fail(where, "needs 'pipeline': a local pipeline directory or a Hub repo id.")

    r = Recipe(pipeline=data["pipeline"], source=None if isinstance(source, dict) else str(source))
    r.revision = data.get("revision")
    r.component = data.get("component")
    r.description = data.get("description")
    r.torch_dtype = str(data.get("torch_dtype", "float32"))
    if r.torch_dtype not in ("float32", "float16", "bfloat16"):
        raise _fail(where, f"torch_dtype must be float32, float16 or bfloat16, got {r.torch_dtype!r}.")
    for key, kind in (("steps", int), ("seed", int), ("num_prompts", int)):
        if key in data and (not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 0):
            raise _fail(where, f"'{key}' must be a non-negative integer, got {data[key]!r}.")
    r.steps = int(data.get("steps", r.steps))
    if r.steps < 1:
        raise _fail(where, "'steps' must be at least 1.")
    r.seed = int(data.get("seed", 0))
    try:
        r.guidance = float(data.get("guidance", r.guidance))
    except (TypeError, ValueError):
        raise _fail(where, f"'guidance' must be a number, got {data.get('guidance')!r}.") from None
    if "resolution" in data:
        r.height = r.width = int(data["resolution"])
    r.height = int(data["height"]) if "height" in data else r.height
    r.width = int(data["width"]) if "width" in data else r.width

    prompts = data.get("prompts", "builtin")
    if prompts == "builtin":
        r.prompts = list(BUILTIN_PROMPTS)
    elif isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts):
        r.prompts = list(prompts)
    elif isinstance(prompts, str):
        file = (base / prompts) if not Path(prompts).is_absolute() else Path(prompts)
        if not file.is_file():
            raise _fail(where, f"'prompts' names '{prompts}', which is neither 'builtin' nor a file.")
        r.prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    else:
        raise _fail(where, "'prompts' must be 'builtin', a text file (one prompt per line) or a list of strings.")
    if "num_prompts" in data:
        r.prompts = r.prompts[: data["num_prompts"]]
    if not r.prompts:
        raise _fail(where, "has no prompts.")

    weights = data.get("weights", {}) or {}
    if not isinstance(weights, dict) or set(weights) - {"budget_bits", "size_mb", "candidates"}:
        raise _fail(where, "'weights' takes budget_bits or size_mb, and candidates.")
    if ("budget_bits" in weights) == ("size_mb" in weights):
        raise _fail(where, "give exactly one of weights.budget_bits (average bits) and weights.size_mb.")
    if "budget_bits" in weights:
        r.budget_bits = float(weights["budget_bits"])
        if not 1 <= r.budget_bits <= 16:
            raise _fail(where, f"weights.budget_bits must be between 1 and 16, got {r.budget_bits}.")
    else:
        r.size_mb = float(weights["size_mb"])
        if r.size_mb <= 0:
            raise _fail(where, "weights.size_mb must be positive.")
    if "candidates" in weights:
        cands = weights["candidates"]
        if not isinstance(cands, dict) or set(cands) - {"content", "quality"} or not cands:
            raise _fail(where, "weights.candidates maps 'content' and/or 'quality' to lists of widths (2, 4, 8).")
        for group, widths in cands.items():
            if not isinstance(widths, list) or not widths or any(w not in (2, 4, 8) for w in widths):
                raise _fail(where, f"weights.candidates.{group} must be a non-empty list of 2, 4 and 8; got {widths!r}.")
        r.candidates = {**r.candidates, **{g: sorted(set(w)) for g, w in cands.items()}}

    acts = data.get("activations", "int8")
    if isinstance(acts, dict):
        if set(acts) - _ACTIVATION_KEYS:
            raise _fail(where, f"'activations' takes {sorted(_ACTIVATION_KEYS)}; got {sorted(acts)}.")
        r.activations = str(acts.get("mode", "int8"))
        cands = acts.get("candidates", [8])
        if not isinstance(cands, list) or not cands or any(w not in (4, 8) for w in cands):
            raise _fail(where, f"activations.candidates must be a non-empty list of 4 and 8; got {cands!r}.")
        r.act_candidates = sorted(set(cands))
        if "budget_bits" in acts:
            r.act_budget_bits = float(acts["budget_bits"])
            if not min(r.act_candidates) <= r.act_budget_bits <= max(r.act_candidates):
                raise _fail(where, f"activations.budget_bits must be between {min(r.act_candidates)} and "
                                   f"{max(r.act_candidates)} (the candidates), got {r.act_budget_bits}.")
        protect = acts.get("protect_most_sensitive", 0)
        if not isinstance(protect, int) or isinstance(protect, bool) or protect < 0:
            raise _fail(where, f"activations.protect_most_sensitive must be a non-negative integer, got {protect!r}.")
        r.act_protect = protect
    else:
        r.activations = str(acts)
    if r.activations not in ("int8", "dynamic", "none"):
        raise _fail(where, f"'activations' (mode) must be int8, dynamic or none, got {r.activations!r}.")
    if r.activations == "none" and (r.act_protect or r.act_budget_bits is not None):
        raise _fail(where, "activations.budget_bits / protect_most_sensitive need activations quantized (mode int8 "
                           "or dynamic).")
    for key in ("sweep_fraction", "content_fraction"):
        if key in data:
            frac = data[key]
            if not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0 < frac <= 1:
                raise _fail(where, f"'{key}' must be a number in (0, 1], got {frac!r}.")
            setattr(r, key, float(frac))
    if data.get("device") is not None:
        r.device = str(data["device"])
    for key in ("protected", "content_patterns"):
        if key in data:
            value = data[key]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise _fail(where, f"'{key}' must be a list of layer-name patterns.")
            setattr(r, key, list(value))
    if "split_ratios" in data:
        ratios = data["split_ratios"]
        if not isinstance(ratios, list) or not ratios or not all(isinstance(k, (int, float)) and k > 0 for k in ratios):
            raise _fail(where, "'split_ratios' must be a list of positive numbers.")
        r.split_ratios = [float(k) for k in ratios]
    r.budget_mode = str(data.get("budget_mode", "at_most"))
    if r.budget_mode not in ("at_most", "band"):
        raise _fail(where, "'budget_mode' must be at_most or band.")
    if r.calibrate_only and r.budget_bits is not None:
        width = next(iter({w for ws in r.candidates.values() for w in ws}))
        if abs(r.budget_bits - width) > 1e-9 and not r.protected:
            raise _fail(where, f"all candidates are {width}-bit, so budget_bits must be {width}.")
    push = data.get("push")
    if push is not None:
        if not isinstance(push, dict) or not isinstance(push.get("repo_id"), str):
            raise _fail(where, "'push' needs a repo_id (and optionally private: true/false).")
        r.push = {"repo_id": push["repo_id"], "private": bool(push.get("private", False))}
    return r


def run_recipe(recipe: Recipe, out: str | os.PathLike, progress: bool = True, cache_dir: str | None = None):
    """Build the recipe's plan and save it as ``out/<component>/plan.json`` (the Hub plan-repo layout).

    The full-precision calibration run and the sensitivity scores are cached in ``cache_dir`` (default
    ``out/.sensitivity-cache``) as they are measured, so a build that was interrupted resumes where it stopped and
    gives the same plan.

    Returns ``(plan, plan_path, report)``; ``report`` is ``None`` for calibrate-only recipes.
    """
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from ..plan import BitPlan
    from ..plan import layer_table
    from .builder import calibrated_plan, build_plan, denoiser_of

    diffusers_logging.disable_progress_bar()
    dtype = getattr(torch, recipe.torch_dtype)
    try:
        pipe = DiffusionPipeline.from_pretrained(recipe.pipeline, revision=recipe.revision, dtype=dtype)
    except (OSError, ValueError) as e:
        raise MixDQError(f"Could not load the recipe's pipeline '{recipe.pipeline}': {e}") from None
    pipe.set_progress_bar_config(disable=True)
    component, denoiser = denoiser_of(pipe, recipe.component)
    settings = recipe.settings()
    settings.component = component
    settings.cache_dir = str(cache_dir if cache_dir is not None else Path(out) / ".sensitivity-cache")
    if recipe.size_mb is not None:
        table = layer_table(denoiser)
        total = sum(info.numel for info in table.values())
        settings.weight_bits = recipe.size_mb * 8 * 2**20 / total
    report = None
    if recipe.calibrate_only:
        width = next(iter({w for ws in recipe.candidates.values() for w in ws}))
        acts: dict[str, Any] = {"activations": "none"}
        act_dtype = f"int{recipe.act_candidates[0]}"
        if recipe.activations == "int8":
            acts = {"activations": act_dtype}
        elif recipe.activations == "dynamic":
            acts = {"activations": act_dtype, "act_range": "dynamic"}
        template = BitPlan(defaults={"weights": f"int{width}", **acts}, ignore=recipe.protected)
        plan = calibrated_plan(pipe, template, settings)
    else:
        plan, report = build_plan(pipe, settings, progress=progress)
    plan.target["base_model"] = recipe.pipeline
    plan.target["revision"] = recipe.revision
    plan.provenance["recipe"] = {
        "source": recipe.source,
        "description": recipe.description,
        "pipeline": recipe.pipeline,
        "steps": recipe.steps,
        "guidance": recipe.guidance,
        "budget_bits": settings.weight_bits,
        "size_mb": recipe.size_mb,
        "activations": recipe.activations,
    }
    from .builder import is_main_process

    path = Path(out) / component / "plan.json"
    if is_main_process():  # in a sharded build every process ends with the same plan; one writes it
        path = plan.save(Path(out) / component)
    return plan, path, report
