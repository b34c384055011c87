"""Checking plan data against format v1: the header, the JSON Schema and the layer manifest, in one validation.

The schema ships beside this module (``plan-v1.schema.json``, also :func:`schema`). :func:`validate_plan_data` is
the one validation: :class:`~diffusers_mixdq.plan.BitPlan` runs it once per load or construction. Schema errors are
explained in the plan's own words (dtype vocabulary, ``act_range`` rules) rather than jsonschema's.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping

from ..errors import PlanFormatError
from ..families import check_pattern
from .extras import check_extras
from .layers import LayerInfo
from .limits import MAX_ACT_RANGE, check_counts, plain_json
from .spec import ACTIVATION_DTYPES, FORMAT_NAME, FORMAT_VERSION, WEIGHT_DTYPES

SCHEMA_FILE = "plan-v1.schema.json"
#: schema errors listed in one PlanFormatError
MAX_ERRORS_SHOWN = 5


@lru_cache(maxsize=1)
def schema() -> dict:
    """The JSON Schema of plan format v1 (shipped with the package)."""
    text = resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    return jsonschema.Draft202012Validator(schema())


def validate_plan_data(data: Any) -> dict[str, Any]:
    """Check a plan's JSON data (a dict as read from ``plan.json``, or built in Python) and return it as plain
    JSON data (a copy: tuples become lists); raises :class:`PlanFormatError`. In order: only JSON values, bounded
    depth (:mod:`.limits`), header, sizes, the schema, every layer-name pattern, the layer manifest."""
    if not isinstance(data, Mapping):
        raise PlanFormatError(f"A plan must be a JSON object, got {type(data).__name__}.")
    check_counts(data)  # first: bounds the work of everything after it
    data = plain_json(data)
    check_header(data)
    _check_schema(data)
    check_extras(data)
    _check_patterns(data)
    _check_manifest(data.get("target") or {})
    return data


def _check_patterns(data: Mapping[str, Any]) -> None:
    """Every rule target and ignore entry compiles (an invalid one is an error even where another pattern of the
    same rule matches)."""
    patterns = [p for rule in data.get("rules") or () for p in rule["targets"]] + list(data.get("ignore") or ())
    where = {p: f"rules/{i}/targets" for i, rule in enumerate(data.get("rules") or ()) for p in rule["targets"]}
    where.update({p: "ignore" for p in data.get("ignore") or ()})
    for pattern in dict.fromkeys(patterns):
        try:
            check_pattern(pattern)
        except PlanFormatError as e:
            raise PlanFormatError(f"{where[pattern]}: {e}") from None


def check_header(data: Mapping[str, Any]) -> None:
    """``format`` and ``version``: a clear error for files that are not plans or come from a newer release."""
    fmt = data.get("format")
    if fmt != FORMAT_NAME:
        raise PlanFormatError(
            f"Not a diffusers-mixdq plan: 'format' is {fmt!r}, expected {FORMAT_NAME!r}. "
            "See docs/plan-format.md for the file layout."
        )
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise PlanFormatError(f"The plan's 'version' must be an integer, got {version!r}.")
    if version > FORMAT_VERSION:
        raise PlanFormatError(
            f"This plan uses format version {version}, but this diffusers-mixdq reads version {FORMAT_VERSION} "
            "only. Upgrade diffusers-mixdq (pip install -U diffusers-mixdq)."
        )
    if version < 1:
        raise PlanFormatError(f"Unknown plan format version {version}; the first version is 1.")


def _check_schema(data: Mapping[str, Any]) -> None:
    errors = sorted(_validator().iter_errors(_one_per_kind(data)), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    lines = []
    for err in errors[:MAX_ERRORS_SHOWN]:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        lines.append(f"{where}: {_explain(err)}")
    raise PlanFormatError(
        "The plan does not follow plan format v1:\n  - " + "\n  - ".join(lines) + "\nSee docs/plan-format.md."
    )


def _one_per_kind(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``data`` with one entry per distinct value in ``layers`` and ``target.layers`` (the first layer holding it).

    The schema checks each entry alone and never its name, so this finds the same errors, naming the first layer
    with each, in time that grows with the number of distinct specs rather than layers (a resolved plan of a large
    model has thousands of layers but a few dozen specs)."""
    out = dict(data)
    if isinstance(data.get("layers"), dict):
        layers = data["layers"]
        plain = {name for name, spec in layers.items() if _plainly_valid(spec)}
        keep = set(list(plain)[:1])
        out["layers"] = _first_of_each({n: s for n, s in layers.items() if n not in plain or n in keep})
    target = data.get("target")
    if isinstance(target, dict) and isinstance(target.get("layers"), dict):
        out["target"] = {**target, "layers": _first_of_each(target["layers"])}
    return out


def _plainly_valid(spec: Any) -> bool:
    """A quick test that accepts only layer specs the schema accepts (others go through the schema)."""
    if type(spec) is not dict or not spec.keys() <= _SPEC_KEYS:
        return False
    weights, acts, r = spec.get("weights", "none"), spec.get("activations", "none"), spec.get("act_range")
    if type(weights) is not str or weights not in WEIGHT_DTYPES or type(acts) is not str or acts not in ACTIVATION_DTYPES:
        return False
    if not (r is None or r == "dynamic" or (type(r) in (int, float) and 0 < r <= MAX_ACT_RANGE)):
        return False
    flags = spec.get("flags", {})
    return type(flags) is dict and type(flags.get("bos_aware", False)) is bool and flags.keys() <= {"bos_aware"}


_SPEC_KEYS = frozenset(("weights", "activations", "act_range", "flags"))


def _first_of_each(entries: dict[str, Any]) -> dict[str, Any]:
    seen: dict[str, str] = {}
    for name, value in entries.items():
        seen.setdefault(json.dumps(value, sort_keys=True), name)
    return {name: entries[name] for name in seen.values()}


def _check_manifest(target: Mapping[str, Any]) -> None:
    if target.get("layers") is None:
        return
    try:
        for info in target["layers"].values():
            LayerInfo.from_json(info)
    except (TypeError, ValueError):
        raise PlanFormatError("target.layers must map layer names to [type, shape].") from None


def _explain(err) -> str:
    path = list(err.absolute_path)
    key = path[-1] if path else None
    if key == "weights" and err.validator == "enum":
        return f"unknown weight dtype {err.instance!r}; use one of {', '.join(WEIGHT_DTYPES)}"
    if key == "activations" and err.validator == "enum":
        return f"unknown activation dtype {err.instance!r}; use one of {', '.join(ACTIVATION_DTYPES)}"
    if key == "act_range":
        return (f"act_range must be a positive number (the absolute max of the layer input, finite and at most "
                f"{MAX_ACT_RANGE:g}), \"dynamic\" or \"dynamic-token\", got {_short(err.instance)}")
    if err.validator in ("maximum", "minimum", "exclusiveMinimum", "type", "enum", "const"):
        return f"{_short(err.instance)} is not allowed here ({err.validator} {_short(err.validator_value)})"
    if err.validator in ("unevaluatedProperties", "additionalProperties"):
        return err.message.replace("Unevaluated properties are not allowed", "unknown field(s)")
    return err.message


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + f"... ({len(text)} characters)"
