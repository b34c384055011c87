"""One plan per pipeline component in one plan directory: ``unet/plan.json``, ``text_encoder/plan.json``, ...

A :class:`~diffusers_mixdq.MixDQConfig` given such a directory without ``component=`` holds every component's plan
(each read and validated at once) and picks one when a model loads with it: the plan of the folder the model's
weights are read from (a pipeline loads each component from the folder named after it), else the only plan made
for the model's class. That is what lets ``PipelineQuantizationConfig(quant_backend="mixdq", quant_kwargs={"plan":
...})`` build one config per component from the same arguments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import PlanSourceError
from .bitplan import BitPlan
from .spec import PLAN_FILENAME

#: the usual component names of diffusers pipelines: a model loaded from a folder so named is that component
PIPELINE_COMPONENTS = frozenset({
    "unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "prior", "decoder",
    "image_encoder", "controlnet",
})


#: readers of plan sets that are not local directories (the Hub registers one): (source, options) -> plans or None
_SET_SOURCES: list[Callable[[str, Mapping[str, Any]], "dict[str, BitPlan] | None"]] = []


def register_set_source(reader: Callable[[str, Mapping[str, Any]], "dict[str, BitPlan] | None"]) -> None:
    """Add a reader of non-local plan sets (idempotent): it returns ``{component: plan}`` for a source holding
    plans only in component folders, else ``None``."""
    if reader not in _SET_SOURCES:
        _SET_SOURCES.append(reader)


def component_plans(source: Any, subfolder: str | None = None, minimum: int = 2, **options: Any) -> dict[str, BitPlan]:
    """``{component: plan}`` when ``source`` is a plan set (a local directory, or a source a registered reader
    knows, e.g. a Hub repo) with no root ``plan.json`` and plans in at least ``minimum`` component folders (and no
    ``subfolder`` picks one); ``{}`` otherwise (the caller reads a single plan). A mapping ``{component: BitPlan}``
    is returned as it is. ``options`` (``revision``, ``token``) go to the readers."""
    if isinstance(source, Mapping) and source and all(isinstance(v, BitPlan) for v in source.values()):
        return dict(source)
    if subfolder or not isinstance(source, (str, os.PathLike)):
        return {}
    text = os.fspath(source)
    if text.lstrip().startswith("{"):
        return {}
    folder = Path(text)
    if not folder.exists():
        return _from_readers(text, minimum, options)
    if not folder.is_dir() or (folder / PLAN_FILENAME).is_file():
        return {}
    names = sorted(p.name for p in folder.iterdir() if (p / PLAN_FILENAME).is_file())
    return {name: BitPlan.load(folder / name) for name in names} if len(names) >= minimum else {}


def _from_readers(source: str, minimum: int, options: Mapping[str, Any]) -> dict[str, BitPlan]:
    from .sources import looks_local

    if looks_local(source):
        return {}
    for reader in _SET_SOURCES:
        plans = reader(source, options)
        if plans is not None:
            return plans if len(plans) >= minimum else {}
    return {}


def folder_of(checkpoint_files: Sequence[str] | None) -> str | None:
    """The name of the folder a model's weights are read from (a pipeline's component folder), if known."""
    if not checkpoint_files:
        return None
    return Path(checkpoint_files[0]).parent.name or None


def pick_component(plans: Mapping[str, BitPlan], folder: str | None, class_name: str) -> str:
    """The component whose plan applies to a ``class_name`` model read from ``folder`` (see the module docstring).

    Raises :class:`PlanSourceError` when the folder is a pipeline component without a plan, or when no single plan
    fits."""
    if folder in plans:
        return folder
    have = ", ".join(sorted(plans))
    if folder in PIPELINE_COMPONENTS:
        raise PlanSourceError(
            f"The plan directory has no plan for the pipeline component '{folder}' (it has plans for {have}). "
            f"Leave '{folder}' out of components_to_quantize, or add a '{folder}/plan.json' (mixdq build / "
            "mixdq skeleton)."
        )
    fits = [name for name, plan in plans.items() if plan.target.get("class_name") == class_name]
    if len(fits) == 1:
        return fits[0]
    raise PlanSourceError(
        f"The plan directory holds plans for several components ({have}) and "
        + (f"{len(fits)} of them are" if fits else "none is")
        + f" made for a {class_name}, so it is not known which to apply. Pass component= (one of {have}) to "
        "MixDQConfig."
    )
