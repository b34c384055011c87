"""The plan-repository layout on the Hub (documented in ``docs/hub.md``) and collecting plans to publish.

A plan repository holds ``plan.json`` (plus the safetensors sidecar it names, ``plan.safetensors`` by default) at
its root and/or in one folder per pipeline component (``unet/``, ``transformer/``, later ``text_encoder/``), and a
generated ``README.md`` model card. A root-level plan belongs to the component its ``target.class_name`` names
(``UNet...`` -> ``unet``, ``...Transformer...`` -> ``transformer``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from ..errors import PlanSourceError
from ..families import DENOISER_COMPONENTS
from ..plan import PLAN_FILENAME, BitPlan

#: the sidecar name BitPlan.save writes beside plan.json
SIDECAR_FILENAME = PLAN_FILENAME.replace(".json", ".safetensors")
CARD_FILENAME = "README.md"
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def plan_path(subfolder: str | None) -> str:
    """Path of the plan file inside a repo, for a component folder (``None`` / ``""``: the root)."""
    return f"{subfolder}/{PLAN_FILENAME}" if subfolder else PLAN_FILENAME


def normalize_subfolder(subfolder: str | None) -> str | None:
    """``None`` for the root; otherwise the folder without surrounding slashes (``"unet/"`` -> ``"unet"``)."""
    if subfolder is None:
        return None
    sub = str(subfolder).strip("/")
    if not sub:
        return None
    if any(part in ("", ".", "..") for part in sub.split("/")):
        raise PlanSourceError(f"subfolder={subfolder!r} is not a folder inside a repository.")
    return sub


def check_component(name: str) -> str:
    if not _COMPONENT.fullmatch(name or ""):
        raise PlanSourceError(
            f"{name!r} is not a valid component folder name; use the pipeline component's name, e.g. 'unet' or "
            "'transformer'."
        )
    return name


def component_for_class(class_name: str | None) -> str | None:
    """The pipeline component a denoiser class usually is, by name: the first of
    :data:`~diffusers_mixdq.families.DENOISER_COMPONENTS` in it (``UNet...`` -> ``unet``, ``...Transformer...`` ->
    ``transformer``)."""
    return next((c for c in DENOISER_COMPONENTS if c in (class_name or "").lower()), None)


def is_plan_file(path_in_repo: str) -> bool:
    """A plan file of the layout (``plan.json`` / ``plan.safetensors`` at the root or one folder deep)."""
    parts = path_in_repo.split("/")
    return len(parts) <= 2 and parts[-1] in (PLAN_FILENAME, SIDECAR_FILENAME)


def collect_plans(source: Any, component: str | None = None) -> dict[str, BitPlan]:
    """``{folder: BitPlan}`` to publish (``""``: the repository root) from what the user passed.

    ``source`` is a :class:`BitPlan`, a mapping ``{component: BitPlan}``, a plan ``.json`` file, or a plan directory
    with ``plan.json`` at its root and/or in component subfolders (``unet/plan.json``, ...). ``component`` puts a
    single root-level plan into that component's folder instead. Every plan is loaded and validated here, so nothing
    malformed is ever uploaded.
    """
    if component is not None:
        component = check_component(component)
    if isinstance(source, BitPlan):
        return {component or "": source.copy()}
    if isinstance(source, Mapping) and source and all(isinstance(v, BitPlan) for v in source.values()):
        if component is not None:
            raise PlanSourceError("component= applies to a single plan, not to a mapping of component plans.")
        return {check_component(k) if k else "": v.copy() for k, v in source.items()}
    if not isinstance(source, (str, os.PathLike)):
        raise PlanSourceError(
            f"Cannot publish a {type(source).__name__}: pass a BitPlan, a plan .json file or a plan directory."
        )
    path = Path(source)
    if path.is_file():
        return {component or "": BitPlan.load(path)}
    if not path.is_dir():
        raise PlanSourceError(f"No plan at '{source}': there is no such file or directory.")
    plans = _plans_in_directory(path, component)
    if component is not None and set(plans) != {component}:
        raise PlanSourceError(
            f"--component/component= moves a single root-level plan into a folder, but '{source}' already has "
            f"component folders ({', '.join(sorted(k for k in plans if k != component))})."
        )
    return plans


def _plans_in_directory(path: Path, component: str | None) -> dict[str, BitPlan]:
    """The root plan of a plan directory (in folder ``component`` if given) and its component-folder plans."""
    plans: dict[str, BitPlan] = {}
    if (path / PLAN_FILENAME).is_file():
        plans[component or ""] = BitPlan.load(path)
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and (p / PLAN_FILENAME).is_file()):
        name = check_component(sub.name)
        if name in plans:
            raise PlanSourceError(
                f"'{path}' has a root plan published as component '{name}' and a '{name}/' plan folder; keep one."
            )
        plans[name] = BitPlan.load(sub)
    if not plans:
        raise PlanSourceError(
            f"'{path}' holds no {PLAN_FILENAME}, neither at its root nor in a component folder (unet/, "
            "transformer/, ...). Save a plan there with BitPlan.save(...) first."
        )
    return plans
