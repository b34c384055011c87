"""The pipeline one-liner: a diffusers ``PipelineQuantizationConfig`` for every component a plan repo covers."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import PlanSourceError
from ..plan import PLAN_FILENAME
from .cache import snapshot_commit
from .failures import READ_HINTS, hub_lookup_errors, missing_plan_message, transfer_errors
from .layout import check_component, component_for_class


def plan_components(
    repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    root_component: str | None = None,
) -> tuple[str, dict[str, str | None]]:
    """``(commit sha, {component: subfolder})`` of the plans in ``repo_id`` at ``revision``.

    Component folders (``unet/plan.json``, ``transformer/plan.json``, ...) map to themselves. A root-level
    ``plan.json`` maps to ``root_component`` if given, else to the component its ``target.class_name`` names
    (``UNet...`` -> ``unet``, ``...Transformer...`` -> ``transformer``); its subfolder is ``None``. The plan files are
    fetched with ``snapshot_download`` (cached; works offline from the cache).
    """
    folder = Path(_plan_snapshot(repo_id, revision, token))
    commit = snapshot_commit(folder)
    if commit is None:
        raise PlanSourceError(f"Unexpected Hugging Face cache layout for '{repo_id}': {folder}.")
    found: dict[str, str | None] = {}
    if (folder / PLAN_FILENAME).is_file():
        found[_root_component(repo_id, folder / PLAN_FILENAME, root_component)] = None
    for sub in sorted(p for p in folder.glob(f"*/{PLAN_FILENAME}") if p.is_file()):
        name = sub.parent.name
        if name in found:
            raise PlanSourceError(
                f"Hub repo '{repo_id}' has both a root-level plan for '{name}' and a '{name}/' plan; keep one of them."
            )
        found[name] = name
    if not found:
        raise PlanSourceError(missing_plan_message(repo_id, PLAN_FILENAME, revision, token))
    return commit, found


def hub_plan_set(source: str, options) -> dict | None:
    """Plan-set reader (see :func:`diffusers_mixdq.plan.components.register_set_source`): ``{component: plan}`` of
    a repo whose plans are all in component folders, all read from one commit; ``None`` for anything else (a repo
    with a root-level plan, or no such repo: the single-plan path then reads it, or reports why it cannot)."""
    from ..plan import resolve_plan_source
    from .download import looks_like_repo_id

    if not looks_like_repo_id(source):
        return None
    revision, token = options.get("revision"), options.get("token")
    try:
        commit, found = plan_components(source, revision, token)
    except PlanSourceError:
        return None
    if any(sub is None for sub in found.values()):
        return None
    return {c: resolve_plan_source(source, revision=commit, subfolder=sub, token=token) for c, sub in found.items()}


def _plan_snapshot(repo_id: str, revision: str | None, token: str | bool | None) -> str:
    """The cache snapshot folder holding the repo's plan files (root and one folder deep) at ``revision``."""
    from huggingface_hub import snapshot_download

    doing = f"listing the plans of Hub repo '{repo_id}' (revision '{revision or 'main'}')"
    with transfer_errors(doing, READ_HINTS), hub_lookup_errors(repo_id, "the plans", revision):
        return snapshot_download(
            repo_id, revision=revision, token=token, allow_patterns=[PLAN_FILENAME, f"*/{PLAN_FILENAME}"]
        )


def _root_component(repo_id: str, path: Path, root_component: str | None) -> str:
    name = root_component or _root_class_component(path)
    if name is None:
        raise PlanSourceError(
            f"Hub repo '{repo_id}' has a root-level {PLAN_FILENAME} without target.class_name, so it is not "
            "known which pipeline component it is for. Pass root_component='unet' (or 'transformer', ...)."
        )
    return check_component(name)


def _root_class_component(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # MixDQConfig reports the broken file properly when it loads it
    target = data.get("target") if isinstance(data, dict) else None
    return component_for_class(target.get("class_name") if isinstance(target, dict) else None)


def pipeline_quantization_config(
    repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    *,
    components: list[str] | None = None,
    strict: bool = True,
    root_component: str | None = None,
):
    """``PipelineQuantizationConfig(quant_mapping={component: MixDQConfig(...)})`` for the plans of ``repo_id``.

    One line to quantize a whole pipeline with a published plan set::

        pipe = DiffusionPipeline.from_pretrained(
            "stabilityai/sd-turbo", quantization_config=pipeline_quantization_config("user/sd-turbo-mixdq"))

    Every component folder with a ``plan.json`` gets a :class:`~diffusers_mixdq.MixDQConfig`; a root-level plan
    goes to ``root_component`` or the component its ``target.class_name`` names (see :func:`plan_components`).
    ``components`` restricts the mapping (each must have a plan). All plans are read from the **same commit**:
    ``revision`` (a branch, tag or sha; default ``main``) is resolved once and each ``MixDQConfig`` is pinned to that
    commit sha, while its plan's ``provenance["source"]["revision"]`` keeps the revision as requested. A plan made
    for another model is refused when the pipeline loads (:class:`~diffusers_mixdq.errors.PlanMismatchError`).
    """
    from diffusers.quantizers import PipelineQuantizationConfig

    from ..config import MixDQConfig

    commit, found = plan_components(repo_id, revision, token, root_component)
    if components is not None:
        missing = sorted(set(components) - set(found))
        if missing:
            raise PlanSourceError(
                f"Hub repo '{repo_id}' has no plan for {', '.join(missing)}; it has plans for "
                f"{', '.join(sorted(found))}."
            )
        found = {c: s for c, s in found.items() if c in components}
    mapping = {}
    for component, subfolder in found.items():
        config = MixDQConfig(plan=repo_id, revision=commit, subfolder=subfolder, token=token, strict=strict)
        config.plan.provenance["source"]["revision"] = revision or "main"
        mapping[component] = config
    return PipelineQuantizationConfig(quant_mapping=mapping)
