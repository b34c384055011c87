"""Checks of the optional per-layer keys the JSON Schema cannot express alone: timestep groups (``act_groups``)
and outlier channels (``outliers``).

:func:`check_extras` runs with the plan's validation (each entry alone); :func:`outlier_problem` at resolution,
where the layer's shape is known. Each problem is one :class:`~diffusers_mixdq.errors.PlanFormatError` /
message naming the entry and the fix.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from ..errors import PlanFormatError
from .layers import LayerInfo
from .spec import DYNAMIC_RANGES, LayerSpec

#: bits of each outlier row's scale and channel index in the size estimates
OUTLIER_SCALE_BITS, OUTLIER_INDEX_BITS = 16, 32
#: weight dtypes whose layers may hold outlier channels (the outlier rows are int8: only narrower layers gain)
OUTLIER_BASE_DTYPES = ("int6", "int5", "int4", "int3", "int2")


def _entries(data: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    if isinstance(data.get("defaults"), dict):
        yield "defaults", data["defaults"]
    for i, rule in enumerate(data.get("rules") or ()):
        yield f"rules/{i}", rule
    for name, spec in (data.get("layers") or {}).items():
        yield f"layers/{name}", spec


def check_extras(data: Mapping[str, Any]) -> None:
    """Timestep groups sorted by ``t_lo``, each ``t_lo <= t_hi``, not overlapping, with a static range; outlier
    channels only in a layer's own entry. Raises :class:`PlanFormatError`."""
    for where, spec in _entries(data):
        if not isinstance(spec, dict):
            continue
        if spec.get("act_groups"):
            _check_groups(where, spec)
        if spec.get("outliers") and not where.startswith("layers/"):
            raise PlanFormatError(f"{where}: 'outliers' names one layer's output channels, so it belongs in that "
                                  "layer's entry under 'layers', not in defaults or rules.")


def _check_groups(where: str, spec: Mapping[str, Any]) -> None:
    groups = spec["act_groups"]
    if spec.get("act_range") in DYNAMIC_RANGES:
        raise PlanFormatError(f"{where}: act_groups are static ranges per timestep group, but act_range is "
                              f"{spec['act_range']!r}; give a number (the range outside the groups) or drop it.")
    previous_hi = None
    for i, (lo, hi, _) in enumerate(groups):
        if lo > hi:
            raise PlanFormatError(f"{where}/act_groups/{i}: t_lo {lo:g} is above t_hi {hi:g}; each group is "
                                  "[t_lo, t_hi, absmax] with t_lo <= t_hi.")
        if previous_hi is not None and lo <= previous_hi:
            raise PlanFormatError(f"{where}/act_groups/{i}: starts at t={lo:g}, inside or before the previous group "
                                  f"(ending at {previous_hi:g}); list groups sorted by t_lo, without overlap.")
        previous_hi = hi


def outlier_problem(name: str, layer: LayerSpec, info: LayerInfo) -> str | None:
    """Why ``layer``'s outlier channels do not fit the model's layer ``name`` (``None``: they do)."""
    if not layer.outliers:
        return None
    if layer.weights not in OUTLIER_BASE_DTYPES:
        return (f"'{name}' has outlier channels but {layer.weights} weights; outlier rows are int8, so only "
                f"{'/'.join(OUTLIER_BASE_DTYPES)} layers may have them")
    bad = [c for c in layer.outlier_channels if c >= info.shape[0]]
    if bad:
        return f"'{name}' has {info.shape[0]} output channels, but its outlier channels include {bad[0]}"
    return None


def outlier_bits(spec: LayerSpec, in_features: int) -> int:
    """Stored bits of ``spec``'s outlier rows (int8 values, a 16-bit scale and an index per row); the layer's
    weight stores its other rows only (summaries count those at its width)."""
    return len(spec.outlier_channels) * (8 * in_features + OUTLIER_SCALE_BITS + OUTLIER_INDEX_BITS)
