"""The MixDQ authors' published plan files, read and written.

MixDQ's code publishes a mixed-precision plan as two flat YAML maps, ``{layer: bits}``: one for weights (``2``,
``4`` or ``8`` bits) and one for activations (``4`` or ``8`` bits; a layer missing from it keeps its input in
floating point). Layer names are diffusers' own with a ``model.`` prefix. Their sensitivity logs map each layer to
a list of scores, one per candidate width in ascending order.

:func:`plan_dict_from_mixdq` turns such maps into an explicit-layer plan (``BitPlan.from_mixdq``);
:func:`plan_to_mixdq` writes a plan back as the same maps. Weights are symmetric per output channel in MixDQ; here
8-bit weights are ``int8`` (per channel, as MixDQ) and 2/4-bit weights ``int2`` / ``int4`` (quanto's grouped
affine layout), activations ``int8`` / ``int4`` per tensor with a dynamic range unless one is given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import PlanFormatError, PlanSourceError
from .spec import FORMAT_NAME, FORMAT_VERSION, LayerSpec

PREFIX = "model."
WEIGHT_BITS = {2: "int2", 4: "int4", 8: "int8"}
ACTIVATION_BITS = {4: "int4", 8: "int8"}
_BITS_OF = {**{v: k for k, v in WEIGHT_BITS.items()}, **{v: k for k, v in ACTIVATION_BITS.items()}}


def read_map(source: str | os.PathLike | Mapping[str, Any], what: str) -> dict[str, Any]:
    """A flat ``{name: value}`` map from a YAML file, an ``http(s)://`` URL or a mapping."""
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        data = _load_yaml(_read_text(source, what), source, what)
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise PlanFormatError(f"The MixDQ {what} file {source} must be a YAML mapping of layer names.")
    return data


def _read_text(source: str | os.PathLike, what: str) -> str:
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        import httpx

        try:
            response = httpx.get(text, follow_redirects=True, timeout=30)
            response.raise_for_status()
        except httpx.HTTPError as e:
            raise PlanSourceError(f"Could not download the MixDQ {what} file {text}: {e}") from None
        return response.text
    path = Path(text)
    if not path.is_file():
        raise PlanSourceError(f"No MixDQ {what} file at '{text}'. Pass the path (or URL) of its YAML file.")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PlanFormatError(f"Could not read the MixDQ {what} file '{text}': {e}") from None


def _load_yaml(text: str, source, what: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PlanFormatError(f"The MixDQ {what} file {source} is not valid YAML: {e}") from None


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def _dtypes(data: Mapping[str, Any], table: Mapping[int, str], what: str, prefix: str) -> dict[str, str]:
    out, bad = {}, []
    for name, bits in data.items():
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in table:
            bad.append(f"{name}: {bits!r}")
            continue
        out[_strip(name, prefix)] = table[bits]
    if bad:
        shown = "; ".join(bad[:5]) + (f"; ... and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise PlanFormatError(
            f"The MixDQ {what} map has widths this plan format cannot express ({shown}). Allowed: "
            f"{', '.join(map(str, sorted(table)))} bits; round such layers to one of them."
        )
    return out


def plan_dict_from_mixdq(
    weights: str | os.PathLike | Mapping[str, Any],
    activations: str | os.PathLike | Mapping[str, Any] | None = None,
    act_range: float | str = "dynamic",
    prefix: str = PREFIX,
    provenance: Mapping[str, Any] | None = None,
):
    """A plan (as its JSON dict; ``BitPlan.from_mixdq`` wraps it) with one explicit entry per layer of the MixDQ
    maps.

    Layers named in neither map are kept in floating point (``defaults`` of ``none``), as in MixDQ. Layers in
    the activation map but not in the weight map keep full-precision weights with quantized inputs.
    """
    w = _dtypes(read_map(weights, "weight"), WEIGHT_BITS, "weight", prefix)
    a = _dtypes(read_map(activations, "activation"), ACTIVATION_BITS, "activation", prefix) if activations else {}
    layers = {}
    for name in sorted(set(w) | set(a)):
        spec: dict[str, Any] = {"weights": w.get(name, "none"), "activations": a.get(name, "none")}
        if name in a:
            spec["act_range"] = act_range
        layers[name] = spec
    prov = {"tool": "mixdq import", "source": "MixDQ published maps", "prefix": prefix}
    for key, src in (("weights_file", weights), ("activations_file", activations)):
        if isinstance(src, (str, os.PathLike)):
            prov[key] = os.path.basename(os.fspath(src))
    prov.update(provenance or {})
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "defaults": {"weights": "none", "activations": "none"},
            "layers": layers, "provenance": prov}


def plan_to_mixdq(plan, model=None, prefix: str = PREFIX) -> tuple[dict[str, int], dict[str, int]]:
    """``(weight map, activation map)`` of a plan, in MixDQ's ``{prefix + layer: bits}`` form.

    Rule-based plans are resolved against ``model`` first. Layers kept in floating point are left out of the
    weight map (MixDQ has no "none" width); float8 has no MixDQ equivalent and raises.
    """
    if not plan.is_resolved and model is None and (plan.rules or plan.ignore):
        raise PlanFormatError("This plan has rules: pass the model (--base) to resolve it before exporting.")
    specs = plan.resolve(model, strict=False).layer_specs() if model is not None else _explicit_specs(plan)
    weights, acts, bad = {}, {}, []
    for name, spec in sorted(specs.items()):
        for dtype, target in ((spec.weights, weights), (spec.activations, acts)):
            if dtype == "none":
                continue
            if dtype not in _BITS_OF:
                bad.append(f"{name}: {dtype}")
                continue
            target[prefix + name] = _BITS_OF[dtype]
    if bad:
        raise PlanFormatError(
            "MixDQ's maps only hold integer widths; these layers use other dtypes: " + "; ".join(bad[:5])
            + ". Change them to int8/int4/int2 (or none) before exporting."
        )
    return weights, acts


def _explicit_specs(plan):
    base = dict(plan.defaults or {})
    return {name: LayerSpec.from_dict({**base, **entry}) for name, entry in plan.layers.items()}


def write_map(data: Mapping[str, int], path: str | os.PathLike) -> Path:
    """Write a ``{layer: bits}`` map as MixDQ's YAML (one ``name: bits`` line per layer, sorted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}: {bits}\n" for name, bits in sorted(data.items())), encoding="utf-8")
    return path
