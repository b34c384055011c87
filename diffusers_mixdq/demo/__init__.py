"""Tiny trained text-to-image models for demos and end-to-end tests, by name (:data:`MODELS`).

``shapes`` (below) and ``scenes`` (a PixArt DiT on two-object scenes, under ``scenes/``) each come with a
scorer, bundled plans (``plans/<name>/``) and three disjoint prompt sets (:func:`prompt_set`: calibration,
validation, test). :func:`pipeline_path` gives either one's pipeline directory.

The bundled ``pipeline/`` directory is an ordinary diffusers
``StableDiffusionPipeline`` (causal CLIP text encoder, cross-attention UNet,
KL autoencoder, DPM-Solver++ scheduler) trained on procedurally rendered
coloured shapes (see :mod:`diffusers_mixdq.demo.data`).  ``scorer/`` holds a
small CNN that reads the attributes back from generated images to measure
text alignment (see :mod:`diffusers_mixdq.demo.scorer`).  ``plans/`` holds
MixDQ plans of its UNet, shipped as package data (see :func:`plan_path`):
``plans/shapes/`` the two that ``mixdq demo`` evaluates, ``plans/shapes-extra/``
three more budgets for the peer benchmark (``benchmarks/peers.py``).

This module only imports the standard library at import time; ``torch`` and
``diffusers`` are imported lazily by :func:`load_pipeline`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List

from .models import MODELS, DemoModel, get_model, model_of_pipeline  # noqa: F401

_HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(_HERE, "defaults.json")) as _f:
    DEFAULTS: dict = json.load(_f)

#: Default number of sampling steps and guidance scale of the bundled pipeline.
NUM_INFERENCE_STEPS: int = DEFAULTS["num_inference_steps"]
GUIDANCE_SCALE: float = DEFAULTS["guidance_scale"]

#: Eight fixed prompts for a demo grid (every colour and shape, all positions).
DEMO_PROMPTS: List[str] = [
    "a large red circle at the top left",
    "a small green square at the top right",
    "a large blue triangle in the center",
    "a small yellow cross at the bottom left",
    "a large purple square at the bottom right",
    "a small white circle in the center",
    "a large green cross at the top right",
    "a small red triangle at the bottom left",
]


def pipeline_path(name: str = "shapes") -> str:
    """Directory of the bundled model ``name``'s diffusers pipeline (``DiffusionPipeline.from_pretrained`` it); a
    :class:`~diffusers_mixdq.errors.MixDQError` naming the directory while a model's weights are not there yet."""
    return get_model(name).pipeline_path()


def scorer_path(name: str = "shapes") -> str:
    """Directory of the bundled model ``name``'s alignment scorer (``config.json`` + ``model.safetensors``)."""
    return str(get_model(name).root / "scorer")


def available_models() -> List[str]:
    """Names of the bundled models whose trained pipeline and bundled plans are there (what ``mixdq demo`` shows by
    default; a model without plans yet can still be evaluated with ``mixdq eval --model NAME --plan ...``)."""
    return [name for name, model in MODELS.items() if model.available() and plans_in(model.plans_dir())]


def prompt_set(model: str = "shapes", split: str = "test", n: int = 64, seed: int = 0) -> List[str]:
    """``n`` prompts of the ``split`` set (calibration, validation or test) of the bundled ``model``; see
    :mod:`diffusers_mixdq.demo.prompt_sets`. The sets are disjoint as sets of captions."""
    from .prompt_sets import prompt_set as make

    return make(model, split, n, seed)


#: sets of bundled plans (folders under ``plans/``): a model's (what ``mixdq demo`` runs), then extra budgets
PLAN_SETS = ("shapes", "shapes-extra", "scenes")


def plans_dir(plan_set: str = "shapes") -> Path:
    """Directory of a set of bundled plans (one sub-directory holding ``plan.json`` per plan)."""
    if plan_set not in PLAN_SETS:
        raise ValueError(f"unknown demo plan set {plan_set!r}; bundled: {', '.join(PLAN_SETS)}")
    return Path(_HERE) / "plans" / plan_set


def plans_in(directory: str | os.PathLike) -> dict[str, Path]:
    """``{name: path}`` of the plans in ``directory`` (its sub-directories holding ``plan.json``), sorted by name;
    empty when ``directory`` is not a directory."""
    root = Path(directory)
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "plan.json").is_file()}


def plan_sets_in(directory: str | os.PathLike) -> dict[str, Path]:
    """``{name: path}`` of the whole-pipeline plan sets in ``directory`` (sub-directories with no ``plan.json`` of
    their own whose component folders hold one, e.g. ``w8a8-te-w8/unet/``, ``w8a8-te-w8/text_encoder/``), sorted
    by name; what ``mixdq demo`` shows after the plans of :func:`plans_in`."""
    root = Path(directory)
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not (p / "plan.json").is_file()
            and any((c / "plan.json").is_file() for c in p.iterdir() if c.is_dir())}


def plan_path(name: str, plan_set: str | None = None) -> Path:
    """Directory of the bundled plan ``name`` (``BitPlan.load`` or ``MixDQConfig(plan=...)`` it), looked up in
    ``plan_set`` or, by default, in every set of :data:`PLAN_SETS`."""
    for candidate in (plan_set,) if plan_set else PLAN_SETS:
        path = plans_dir(candidate) / name
        if (path / "plan.json").is_file():
            return path
    where = plan_set or " or ".join(PLAN_SETS)
    raise FileNotFoundError(f"No bundled demo plan {name!r} in {where}.")


def bundled_plan(model: str, name: str) -> Path | None:
    """Directory of the bundled plan ``name`` of ``model`` (in ``plans/<model>/``, then ``plans/<model>-extra/``),
    None if there is none."""
    for plan_set in (model, f"{model}-extra"):
        path = Path(_HERE) / "plans" / plan_set / name
        if (path / "plan.json").is_file() or any(path.glob("*/plan.json")):  # a plan, or a plan per component
            return path
    return None


def load_pipeline(torch_dtype=None, device: str = "cpu"):
    """Load the bundled ``StableDiffusionPipeline`` (fp32 by default) on ``device``.

    Progress bars are disabled; call ``pipe.set_progress_bar_config(disable=False)``
    to re-enable them.
    """
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(pipeline_path(), dtype=torch_dtype or torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def eval_prompts(n: int = 64, seed: int = 0) -> List[str]:
    """``n`` deterministic prompts covering the whole attribute space of ``shapes`` (not a held-out set: evaluate on
    ``prompt_set("shapes", "test", n)``, calibrate on ``prompt_set("shapes", "calibration", n)``).

    Every colour, shape, position and size occurs equally often (up to
    rounding); the combinations are drawn with ``seed``.  See
    :func:`diffusers_mixdq.demo.data.balanced_prompts`.
    """
    from .data import balanced_prompts

    return balanced_prompts(n, seed=seed)
