"""Resolving a plan against a model: defaults, rules, ignore list and explicit layers -> one spec per layer.

Precedence, per quantizable layer (later steps override earlier ones, key by key): ``defaults``; every rule whose
``targets`` match, in order; ``ignore`` (back to floating point); the layer's explicit entry. Patterns are matched
with :func:`diffusers_mixdq.families.match_all` (``re:`` regex or glob over the full name, run by RE2): all the
patterns are matched against each layer name in one pass, so no pattern can hang and many patterns stay fast.

The steps, in the order they run (each raises :class:`PlanMismatchError` / :class:`PlanFormatError` or warns):
target class and fingerprint, explicit layers, per-layer resolution, unused rules and uncovered layers, BOS-aware
flags, ``act_range`` fill-in from calibration, and the resolved target with its layer manifest.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import PlanFormatError, PlanMismatchError
from ..families import family_of, match_all
from .extras import outlier_problem
from .limits import MAX_ACT_RANGE
from .layers import LayerInfo, fingerprint, layer_table, module_types, table_differences
from .spec import NOT_QUANTIZED, SPEC_KEYS, LayerSpec

#: warnings point at the caller of ``BitPlan.resolve`` (_complain <- _report_* <- resolve_plan <- BitPlan.resolve)
_CALLER = 5


@dataclass
class Resolution:
    """A plan resolved against a model: the full ``target`` and one layer spec (as a dict) per layer."""

    target: dict[str, Any]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)


def resolve_plan(
    plan,
    model: nn.Module,
    strict: bool = True,
    extra_ignore: Iterable[str] = (),
    act_ranges: Mapping[str, float] | None = None,
) -> Resolution:
    """Resolve ``plan`` (a :class:`~diffusers_mixdq.plan.BitPlan`) against ``model``; see ``BitPlan.resolve``."""
    table = layer_table(model)
    class_name = type(model).__name__
    check_target(plan.target, plan.manifest(), class_name, table)
    check_explicit_layers(plan.layers, model, table)
    raw, hits, uncovered, by_pattern = resolve_specs(plan, table, list(plan.ignore) + list(extra_ignore))
    unused = [rule["targets"] for rule, n in zip(plan.rules, hits) if n == 0]
    _report_unused_rules(unused, class_name, strict)
    _report_unused_ignore([p for p in plan.ignore if not by_pattern[p]], class_name, strict)
    _report_uncovered(uncovered, class_name, strict)
    bos_dim = (plan.target.get("bos") or {}).get("dim")
    text_kv = matching(family_of(class_name).text_kv, table) if bos_dim else set()
    _check_bos_dim(bos_dim, text_kv, table, class_name)
    layers = finalise_specs(raw, table, bos_dim, text_kv, act_ranges or {})
    return Resolution(resolved_target(plan.target, class_name, table), layers)


def check_target(
    target: Mapping[str, Any], manifest: dict[str, LayerInfo] | None, class_name: str, table: dict[str, LayerInfo]
) -> None:
    """The model is of the plan's class and has the plan's fingerprint (differences listed from the manifest)."""
    want_class = target.get("class_name")
    if want_class and want_class != class_name:
        raise PlanMismatchError(
            f"This plan was made for a {want_class}, but it is being applied to a {class_name}. Use a plan "
            f"built for this model (or build one with `mixdq build`)."
        )
    want = target.get("fingerprint")
    if want and want != fingerprint(table):
        detail = table_differences(manifest, table) if manifest is not None else []
        base = target.get("base_model")
        raise PlanMismatchError(
            "This plan was made for another architecture: the model's layers do not match the plan's "
            "fingerprint"
            + (f" (plan built for {base})" if base else "")
            + (":\n  - " + "\n  - ".join(detail) if detail else ".")
            + "\nUse a plan built for this model."
        )


def check_explicit_layers(names: Iterable[str], model: nn.Module, table: dict[str, LayerInfo]) -> None:
    """Every explicitly named layer exists in ``model`` and is a Linear or Conv2d."""
    missing = [name for name in names if name not in table]
    if not missing:
        return
    types = module_types(model)
    problems = [
        f"layer '{name}' is a {types[name]}, which cannot be quantized (only Linear and Conv2d can); "
        "remove it from the plan"
        if name in types
        else f"layer '{name}' does not exist in {type(model).__name__}"
        for name in missing
    ]
    raise PlanMismatchError(listing("The plan names layers that cannot be quantized", problems))


def matching(patterns: Iterable[str], names: Iterable[str]) -> set[str]:
    """The names that match any of ``patterns``."""
    return set().union(*match_all(patterns, names).values())


def resolve_specs(
    plan, table: Mapping[str, LayerInfo], ignore: list[str]
) -> tuple[dict[str, dict[str, Any]], list[int], list[str], dict[str, set[str]]]:
    """Per layer, defaults < rules < ignore < explicit entry. Returns the raw specs, how many layers each rule
    matched, the layers nothing covers (kept in floating point) and the layers each pattern matched."""
    by_pattern = match_all([*ignore, *(p for r in plan.rules for p in r["targets"])], table)
    rule_layers = [set().union(*(by_pattern[p] for p in rule["targets"])) for rule in plan.rules]
    ignored = set().union(*(by_pattern[p] for p in ignore))
    rules = [{k: v for k, v in rule.items() if k in SPEC_KEYS} for rule in plan.rules]
    raw: dict[str, dict[str, Any]] = {}
    uncovered: list[str] = []
    for name in table:
        hit = [spec for spec, layers in zip(rules, rule_layers) if name in layers]
        spec = _layer_spec(plan.defaults, hit, name in ignored, plan.layers.get(name))
        if spec is None:
            uncovered.append(name)
            spec = dict(NOT_QUANTIZED)
        raw[name] = spec
    return raw, [len(layers) for layers in rule_layers], uncovered, by_pattern


def _layer_spec(defaults, rules: list[dict], ignored: bool, explicit) -> dict[str, Any] | None:
    """One layer's spec from what covers it (``None``: nothing does)."""
    if defaults is None and not rules and not ignored and explicit is None:
        return None
    spec: dict[str, Any] = dict(defaults or {})
    for rule in rules:
        spec.update(rule)
    if ignored:
        spec = dict(NOT_QUANTIZED)
    if explicit is not None:
        spec.update(explicit)
    return spec


def _report_unused_rules(unused: list[list[str]], class_name: str, strict: bool) -> None:
    if unused:
        head = (
            f"These plan rules match no layer of {class_name} (check the patterns; globs match the full "
            "layer name, regexes need a 're:' prefix)"
        )
        _complain(listing(head, [str(t) for t in unused]), strict, "Or pass strict=False to ignore them.", "")


def _report_unused_ignore(unused: list[str], class_name: str, strict: bool) -> None:
    if unused:
        head = (f"These 'ignore' patterns of the plan match no layer of {class_name} (a typo? globs match the full "
                "layer name, regexes need a 're:' prefix)")
        _complain(listing(head, unused), strict, "Fix or remove them, or pass strict=False to ignore them.", "")


def _check_bos_dim(bos_dim: int | None, text_kv: set[str], table: Mapping[str, LayerInfo], class_name: str) -> None:
    """A plan's BOS state must fit the text-reading layers of the model (else BOS handling would silently be off)."""
    if not bos_dim or not text_kv or any(_bos_capable(table[n], bos_dim) for n in text_kv):
        return
    dims = sorted({table[n].in_features for n in text_kv})
    raise PlanMismatchError(
        f"The plan carries a {bos_dim}-dim BOS state (target.bos.dim), but the layers of {class_name} that read "
        f"the text encoder's hidden states take {', '.join(map(str, dims))}-dim inputs, so none of them can be "
        "BOS-aware: the plan was made with another text encoder. Attach the BOS state of this model's text "
        "encoder (diffusers_mixdq.bos.attach_bos), or use a plan built for this model."
    )


def _report_uncovered(uncovered: list[str], class_name: str, strict: bool) -> None:
    if uncovered:
        _complain(
            listing(f"The plan says nothing about {len(uncovered)} quantizable layer(s) of {class_name}", uncovered),
            strict,
            "Add them to the plan (or give it 'defaults'), or pass strict=False to keep them in floating point.",
            "They stay in floating point.",
        )


def _complain(message: str, strict: bool, fix: str, consequence: str) -> None:
    """Raise (``strict``) or warn, for findings that strict=False tolerates."""
    if strict:
        raise PlanMismatchError(message + fix)
    warnings.warn(message + consequence, stacklevel=_CALLER)


def finalise_specs(
    raw: Mapping[str, dict[str, Any]],
    table: Mapping[str, LayerInfo],
    bos_dim: int | None,
    text_kv: set[str],
    act_ranges: Mapping[str, float],
) -> dict[str, dict[str, Any]]:
    """BOS-aware flags and calibrated ranges filled in, each spec normalised; checks both."""
    final: dict[str, dict[str, Any]] = {}
    bad_bos: list[str] = []
    no_range: list[str] = []
    misfit: list[str | None] = []
    for name, spec in raw.items():
        info = table[name]
        flags = bos_flags(dict(spec.get("flags") or {}), info, bos_dim, name in text_kv)
        if flags.get("bos_aware") and not _bos_capable(info, bos_dim):
            bad_bos.append(f"'{name}' ({info.type}, {info.in_features} inputs; plan BOS state: {bos_dim or 'none'})")
        layer = _layer_from(spec, flags, act_ranges.get(name))
        misfit.append(outlier_problem(name, layer, info))
        if layer.activations != "none" and layer.act_range is None:
            no_range.append(name)
        final[name] = layer.to_dict()
    _check_bos(bad_bos)
    _check_ranges(no_range)
    if any(misfit):
        raise PlanMismatchError(listing("These layers' outlier channels do not fit them", [m for m in misfit if m]))
    return final


def bos_flags(flags: dict[str, Any], info: LayerInfo, bos_dim: int | None, reads_text: bool) -> dict[str, Any]:
    """A layer's flags with ``bos_aware`` set by default on text-reading layers that can be BOS-aware."""
    if bos_dim and "bos_aware" not in flags and reads_text and _bos_capable(info, bos_dim):
        flags["bos_aware"] = True
    return flags


def _bos_capable(info: LayerInfo, bos_dim: int | None) -> bool:
    return info.type == "Linear" and info.in_features == bos_dim


def _layer_from(spec: Mapping[str, Any], flags: dict[str, Any], act_range: float | None) -> LayerSpec:
    """The layer's spec with ``flags``, a calibrated range where a static one is missing, and no BOS flag on a
    layer kept in floating point."""
    spec = {**spec, "flags": flags}
    if act_range is not None and spec.get("activations", "none") != "none" and spec.get("act_range") is None:
        spec["act_range"] = _calibrated(act_range)
    layer = LayerSpec.from_dict(spec)
    if not layer.is_quantized and layer.flags.get("bos_aware"):
        flags = {k: v for k, v in layer.flags.items() if k != "bos_aware"}
        layer = LayerSpec(layer.weights, layer.activations, layer.act_range, flags)
    return layer


def _calibrated(value: Any) -> float:
    """A calibrated range, checked as the schema checks a plan's (the resolved plan is not validated again)."""
    try:
        r = float(value)
    except (TypeError, ValueError, OverflowError):
        r = math.nan
    if not (math.isfinite(r) and 0 < r <= MAX_ACT_RANGE):
        raise PlanFormatError(f"A calibrated activation range is {value!r}; ranges must be finite numbers with "
                              f"0 < range <= {MAX_ACT_RANGE:g}. Recalibrate with finite, non-zero inputs.")
    return r


def _check_bos(bad: list[str]) -> None:
    if bad:
        raise PlanMismatchError(
            listing("These layers are flagged BOS-aware but cannot be (BOS-aware layers are Linear layers that "
                    "read the text encoder's hidden states, and the plan must carry that encoder's BOS state)", bad)
            + "Attach the BOS state with diffusers_mixdq.bos.attach_bos(), or remove the flag."
        )


def _check_ranges(no_range: list[str]) -> None:
    if no_range:
        raise PlanFormatError(
            listing("Static activation quantization needs a range, and these layers have none", no_range)
            + "Give each an 'act_range' (the absolute max of its input, from calibration) or set "
            "act_range to \"dynamic\"."
        )


def resolved_target(target: Mapping[str, Any], class_name: str, table: Mapping[str, LayerInfo]) -> dict[str, Any]:
    """The plan's target completed with the model's class, fingerprint and layer manifest."""
    return {
        **target,
        "class_name": class_name,
        "fingerprint": fingerprint(dict(table)),
        "layers": {name: info.to_json() for name, info in table.items()},
    }


def listing(head: str, items: list[str], limit: int = 8) -> str:
    """``head:`` and the first ``limit`` items, one per line."""
    shown = items[:limit]
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{head}:\n  - " + "\n  - ".join(shown) + more + "\n"
