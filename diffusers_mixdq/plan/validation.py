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
from .layers import LayerInfo
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


def validate_plan_data(data: Any) -> None:
    """Check a plan's JSON data (a dict as read from ``plan.json``); raises :class:`PlanFormatError`."""
    if not isinstance(data, Mapping):
        raise PlanFormatError(f"A plan must be a JSON object, got {type(data).__name__}.")
    check_header(data)
    _check_schema(data)
    _check_manifest(data.get("target") or {})


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
    errors = sorted(_validator().iter_errors(data), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    lines = []
    for err in errors[:MAX_ERRORS_SHOWN]:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        lines.append(f"{where}: {_explain(err)}")
    raise PlanFormatError(
        "The plan does not follow plan format v1:\n  - " + "\n  - ".join(lines) + "\nSee docs/plan-format.md."
    )


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
        return f"act_range must be a positive number (absolute max) or \"dynamic\", got {err.instance!r}"
    if err.validator in ("unevaluatedProperties", "additionalProperties"):
        return err.message.replace("Unevaluated properties are not allowed", "unknown field(s)")
    return err.message
