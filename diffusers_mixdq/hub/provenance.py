"""A plan's provenance (what ``mixdq build`` records in ``plan.json``) as readable rows: what it was built from,
under which budget, measured with which metrics, allocated how, at what cost. Used by the model card and by
``mixdq inspect``. ``public=True`` (the model card) never shows a local path: a local base model or recipe file is
named by its last path component only.
"""

from __future__ import annotations

import json
from pathlib import PurePath
from typing import Any

#: how the builder names its sensitivity metrics, for people
METRIC_NAMES = {"ssim": "SSIM of the images", "sqnr_db": "SQNR (dB) of the denoiser output"}


def is_hub_id(base: str | None, provenance: dict | None = None) -> bool:
    """Whether ``base`` (a plan's ``target.base_model``) names a Hub repo, not a local directory: ``namespace/name``
    and, when the plan was built by ``mixdq build``, a pipeline the build did not find on disk."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    recipe = (provenance or {}).get("recipe") or {}
    if not base or recipe.get("pipeline_is_local") or base.count("/") != 1 or base.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(base)
    except HFValidationError:
        return False
    return True


def _where(value: Any, public: bool) -> str:
    return PurePath(str(value)).name if public else str(value)


def _built_from(prov: dict, target: dict, public: bool) -> list[tuple[str, str]]:
    recipe, rows = prov.get("recipe") or {}, [("built with", str(prov.get("tool", "?")))]
    base = target.get("base_model") or recipe.get("pipeline")
    if base:
        hub = is_hub_id(base, prov)
        shown = base if hub or not public else f"a local pipeline directory (`{_where(base, True)}`)"
        rev = f" @ {target['revision']}" if target.get("revision") else ""
        rows.append(("base model", shown + rev))
    if recipe.get("source"):
        rows.append(("recipe", _where(recipe["source"], public)
                     + (f": {recipe['description']}" if recipe.get("description") else "")))
    return rows


def _budget(prov: dict) -> list[tuple[str, str]]:
    recipe, settings = prov.get("recipe") or {}, prov.get("settings") or {}
    rows = []
    bits = recipe.get("budget_bits", settings.get("weight_bits"))
    if recipe.get("size_mb"):
        rows.append(("budget", f"{recipe['size_mb']} MiB of quantizable weights ({bits:.2f} average bits)"))
    elif bits:
        rows.append(("budget", f"{bits:.2f} average weight bits ({settings.get('budget_mode', 'at_most')})"))
    if settings.get("widths"):
        rows.append(("candidate widths", ", ".join(f"{g}: {'/'.join(map(str, w))} bits"
                                                   for g, w in settings["widths"].items())))
    if settings.get("protected"):
        rows.append(("kept in floating point", ", ".join(settings["protected"])))
    acts = recipe.get("activations", settings.get("activations"))
    if acts:
        rows.append(("activations", str(acts)))
    return rows


def _calibration(prov: dict) -> list[tuple[str, str]]:
    if "num_prompts" not in prov:
        return []
    s = prov.get("settings") or prov
    run = [f"{prov['num_prompts']} prompts (sha256 {str(prov.get('prompts_sha256'))[:12]}…)"]
    run += [f"{k} {s[k]}" for k in ("steps", "guidance", "seed") if s.get(k) is not None]
    if s.get("height"):
        run.append(f"{s['height']}x{s['width']}")
    return [("calibration", ", ".join(run))]


def _metrics(prov: dict) -> list[tuple[str, str]]:
    rows, metrics = [], prov.get("sensitivity_metric") or {}
    if all(isinstance(v, str) for v in metrics.values()):  # plans built before activations were measured
        metrics = {"weights": metrics} if metrics else {}
    for kind, groups in metrics.items():
        text = "; ".join(f"{g} layers: {METRIC_NAMES.get(m, m)}" for g, m in sorted(groups.items()))
        rows.append((f"sensitivity ({kind})", text))
    return rows


def _allocation(prov: dict) -> list[tuple[str, str]]:
    alloc = prov.get("allocation")
    if not alloc:
        return []
    solver = (prov.get("settings") or {}).get("allocator", "highs")
    mse = alloc.get("candidate_mse") or []
    rows = [("weight allocation", f"{solver}: {alloc.get('status')}, {alloc.get('avg_bits', 0):.3f} average bits, "
             f"MIP gap {alloc.get('mip_gap')}; content/quality split k={alloc.get('k')} chosen among "
             f"{len(alloc.get('candidates', []))} candidates" + (f" (MSE vs FP {min(mse):.3g})" if mse else ""))]
    for act in alloc.get("activations") or []:
        rows.append(("activation allocation", f"{act.get('status')}, element-weighted average "
                     f"{act.get('avg_bits', 0):.3f} bits"))
    if alloc.get("activations_kept_unquantized"):
        rows.append(("inputs kept unquantized", ", ".join(alloc["activations_kept_unquantized"])))
    return rows


def _cost(prov: dict) -> list[tuple[str, str]]:
    rows = []
    samples = {k: v for k, v in (prov.get("sample_evaluations") or {}).items() if k != "naive_total"}
    reused = (prov.get("reused_from_cache") or {}).get("sample_evaluations") or {}
    if samples or reused:
        done, again = sum(samples.values()), sum(reused.values())
        naive = (prov.get("sample_evaluations") or {}).get("naive_total")
        text = f"{done + again:,}"
        if again:
            text += f" ({done:,} measured by the run that wrote this plan, {again:,} taken from its cache)"
        if naive:
            text += f"; naive protocol: {naive:,} ({naive / (done + again):.1f}x more)" if done + again else ""
        rows.append(("denoiser sample-evaluations", text))
    if prov.get("seconds"):
        rows.append(("seconds", ", ".join(f"{k} {v:.1f}" for k, v in prov["seconds"].items())))
    return rows


def provenance_rows(prov: dict, target: dict | None = None, public: bool = False) -> list[tuple[str, str]]:
    """Readable ``(what, value)`` rows of a plan's provenance, in display order."""
    if not prov:
        return []
    rows = _built_from(prov, target or {}, public) + _budget(prov) + _calibration(prov) + _metrics(prov)
    rows += _allocation(prov) + _cost(prov)
    known = {"tool", "recipe", "settings", "num_prompts", "prompts_sha256", "sensitivity_metric", "allocation",
             "sample_evaluations", "reused_from_cache", "seconds", "denoiser_evaluations", "steps", "guidance"}
    rows += [(k, json.dumps(v, default=str)) for k, v in prov.items() if k not in known and not public]
    return rows
