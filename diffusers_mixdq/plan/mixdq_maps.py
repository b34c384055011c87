"""The MixDQ authors' published plan files, read and written.

MixDQ's code publishes a mixed-precision plan as two flat YAML maps, ``{layer: bits}``: one for weights (``2``,
``4`` or ``8`` bits) and one for activations (``4`` or ``8`` bits; a layer missing from it keeps its input in
floating point). Layer names are diffusers' own with a ``model.`` prefix. Their sensitivity logs map each layer to
a list of scores, one per candidate width in ascending order. Their W*A8 runs also take an "act protect" list
(``act_sensitivie_a8_1%.pt``: layer names) whose layers stay fully in floating point, weights included.

:func:`plan_dict_from_mixdq` turns such maps into an explicit-layer plan (``BitPlan.from_mixdq``);
:func:`plan_to_mixdq` writes a plan back as the same maps. Weights are symmetric per output channel in MixDQ; here
8-bit weights are ``int8`` (per channel, as MixDQ) and 2/4-bit weights ``int2`` / ``int4`` (quanto's grouped
affine layout), activations ``int8`` / ``int4`` per tensor with a dynamic range unless one is given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

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


def read_names(source: str | os.PathLike | Sequence[str]) -> list[str]:
    """Layer names kept fully in floating point: a list, a YAML/JSON list file, or MixDQ's "act protect" ``.pt``
    (a saved list of strings, read with ``torch.load(weights_only=True)``, which loads no code)."""
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith((".pt", ".pth")):
        names = _load_torch_list(Path(source))
    elif isinstance(source, (str, os.PathLike)):
        names = _load_yaml(_read_text(source, "keep-FP"), source, "keep-FP")
    else:
        names = source
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise PlanFormatError(f"The MixDQ keep-FP list {source} must be a list of layer names (a YAML list, or "
                              "MixDQ's act_sensitivie_*.pt).")
    return list(names)


def _load_torch_list(path: Path) -> Any:
    import pickle

    import torch

    if not path.is_file():
        raise PlanSourceError(f"No MixDQ keep-FP file at '{path}'. Pass the path of their act_sensitivie_*.pt.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise PlanFormatError(f"Could not read the MixDQ keep-FP file '{path}' as a saved list of names: {e}") from None


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
    keep_fp: str | os.PathLike | Sequence[str] | None = None,
):
    """A plan (as its JSON dict; ``BitPlan.from_mixdq`` wraps it) with one explicit entry per layer of the MixDQ
    maps.

    Layers named in neither map are kept in floating point (``defaults`` of ``none``), as in MixDQ. Layers in
    the activation map but not in the weight map keep full-precision weights with quantized inputs. Layers of
    ``keep_fp`` (MixDQ's "act protect" list: a list, a YAML/JSON list file or their ``.pt``) stay fully in
    floating point; the widths the maps gave them are kept in ``provenance.keep_fp`` so export can write them back.
    """
    raw_w = read_map(weights, "weight")
    raw_a = read_map(activations, "activation") if activations else {}
    w = _dtypes(raw_w, WEIGHT_BITS, "weight", prefix)
    a = _dtypes(raw_a, ACTIVATION_BITS, "activation", prefix)
    fp = {_strip(n, prefix) for n in read_names(keep_fp)} if keep_fp is not None else set()
    layers = {}
    for name in sorted(set(w) | set(a) | fp):
        spec: dict[str, Any] = {"weights": w.get(name, "none"), "activations": a.get(name, "none")}
        if name in fp:
            spec = {"weights": "none", "activations": "none"}
        elif name in a:
            spec["act_range"] = act_range
        layers[name] = spec
    prov: dict[str, Any] = {"tool": "mixdq import", "source": "MixDQ published maps", "prefix": prefix}
    for key, src in (("weights_file", weights), ("activations_file", activations), ("keep_fp_file", keep_fp)):
        if isinstance(src, (str, os.PathLike)):
            prov[key] = os.path.basename(os.fspath(src))
    if fp:
        prov["keep_fp"] = {n: {"weights": raw_w.get(prefix + n), "activations": raw_a.get(prefix + n)}
                           for n in sorted(fp)}
    prov.update(provenance or {})
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "defaults": {"weights": "none", "activations": "none"},
            "layers": layers, "provenance": prov}


def plan_to_mixdq(
    plan, model=None, prefix: str = PREFIX, keep_fp: bool = False
) -> tuple[dict[str, int], dict[str, int], list[str]]:
    """``(weight map, activation map, keep-FP list)`` of a plan, in MixDQ's ``{prefix + layer: bits}`` form.

    Rule-based plans are resolved against ``model`` first. Layers kept in floating point are left out of the
    weight map (MixDQ has no "none" width); float8 has no MixDQ equivalent and raises. With ``keep_fp``, the
    layers fully in floating point are listed (MixDQ's "act protect" list) and those an import recorded in
    ``provenance.keep_fp`` get their published widths back in the maps; without it the list is empty.
    """
    if not plan.is_resolved and model is None and (plan.rules or plan.ignore):
        raise PlanFormatError("This plan has rules: pass the model (--base) to resolve it before exporting.")
    specs = plan.resolve(model, strict=False).layer_specs() if model is not None else _explicit_specs(plan)
    weights, acts, bad = {}, {}, []
    fp = sorted(n for n, sp in specs.items() if sp.weights == "none" and sp.activations == "none") if keep_fp else []
    recorded = (plan.provenance.get("keep_fp") or {}) if keep_fp else {}
    for name in fp:
        for kind, target in (("weights", weights), ("activations", acts)):
            bits = (recorded.get(name) or {}).get(kind)
            if bits is not None:
                target[prefix + name] = bits
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
    return dict(sorted(weights.items())), dict(sorted(acts.items())), [prefix + n for n in fp]


def _explicit_specs(plan):
    base = dict(plan.defaults or {})
    return {name: LayerSpec.from_dict({**base, **entry}) for name, entry in plan.layers.items()}


def write_map(data: Mapping[str, int] | Sequence[str], path: str | os.PathLike) -> Path:
    """Write a ``{layer: bits}`` map as MixDQ's YAML (one ``name: bits`` line per layer, sorted), or a list of
    names as a YAML list (one ``- name`` line each, sorted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{k}: {v}" for k, v in sorted(data.items())] if isinstance(data, Mapping) else [f"- {n}" for n in sorted(data)]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path
