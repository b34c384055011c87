"""Plan format v1: the per-layer bit-width plan as data, and :class:`BitPlan`, its Python face.

A plan says, for each Linear / Conv2d layer of a diffusers denoiser, how its weights are stored (int8, int4, int2,
float8 or kept in floating point) and how its input activations are quantized (int8, int4, float8 or not at all, with a
static absolute-max range or a dynamic one). Layers are named explicitly, or by rules (name patterns) over
defaults, with an ignore list. Resolving a plan against a model turns it into an explicit per-layer table, which is
what a saved quantized model carries. The format is JSON (documented in ``docs/plan-format.md``, schema in
``plan-v1.schema.json`` beside this file); tensors ride in a safetensors sidecar, never pickle.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from ..errors import PlanFormatError, PlanMismatchError
from .layers import LayerInfo, fingerprint, layer_table, module_types, table_differences

FORMAT_NAME = "diffusers-mixdq-plan"
FORMAT_VERSION = 1
PLAN_FILENAME = "plan.json"

#: weight dtype -> bits per stored element (``None``: kept in the model's floating-point dtype)
WEIGHT_DTYPES: dict[str, int | None] = {"int8": 8, "int4": 4, "int2": 2, "float8": 8, "none": None}
#: activation dtype -> bits (``None``: not quantized)
ACTIVATION_DTYPES: dict[str, int | None] = {"int8": 8, "int4": 4, "float8": 8, "none": None}
DYNAMIC = "dynamic"
#: sidecar key of the text encoder's BOS hidden state (see diffusers_mixdq.bos)
BOS_STATE_KEY = "bos.hidden_state"
#: layers that read the text encoder's hidden states; BOS-aware by default when the plan carries a BOS state
BOS_DEFAULT_PATTERNS = ("*attn2.to_k", "*attn2.to_v", "*.add_k_proj", "*.add_v_proj")
#: a token-0 input counts as the recorded BOS state when ||x0 - h|| <= BOS_MATCH_TOLERANCE * ||h||
BOS_MATCH_TOLERANCE = 2e-2
SPEC_KEYS = ("weights", "activations", "act_range", "flags")


@lru_cache(maxsize=1)
def schema() -> dict:
    """The JSON Schema of plan format v1 (shipped with the package)."""
    text = resources.files(__package__).joinpath("plan-v1.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


@dataclass(frozen=True)
class LayerSpec:
    """The resolved precision of one layer."""

    weights: str = "none"
    activations: str = "none"
    act_range: float | str | None = None
    flags: Mapping[str, Any] = field(default_factory=dict)

    @property
    def weight_bits(self) -> int | None:
        return WEIGHT_DTYPES[self.weights]

    @property
    def activation_bits(self) -> int | None:
        return ACTIVATION_DTYPES[self.activations]

    @property
    def is_quantized(self) -> bool:
        return self.weights != "none" or self.activations != "none"

    @property
    def dynamic(self) -> bool:
        return self.act_range == DYNAMIC

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"weights": self.weights, "activations": self.activations}
        if self.activations != "none":
            out["act_range"] = self.act_range
        if self.flags:
            out["flags"] = dict(self.flags)
        return out


def _matches(pattern: str, name: str) -> bool:
    """``re:<regex>`` is matched with :func:`re.fullmatch`; anything else is a glob over the full name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def storage_bits_per_weight(dtype: str, info: LayerInfo, float_bits: int = 16) -> float:
    """Estimated stored bits per weight element, quantization metadata included, as the default weight backend
    lays the weight out (``none``: the floating-point dtype itself)."""
    from ..registry import DEFAULT_WEIGHT_BACKEND, WEIGHT_BACKENDS

    backend = WEIGHT_BACKENDS.get(DEFAULT_WEIGHT_BACKEND)
    return backend.storage_bits(dtype, WEIGHT_DTYPES[dtype], info.in_features, float_bits)


@dataclass
class PlanSummary:
    """Counts and size estimates for a resolved plan (see :meth:`BitPlan.summary`)."""

    num_layers: int
    weight_layers: dict[str, int]
    activation_layers: dict[str, int]
    params: int
    avg_weight_bits: float
    avg_activation_bits: float | None
    size_bytes: float
    fp16_bytes: float
    fp32_bytes: float
    other_params: int = 0

    @property
    def ratio_vs_fp16(self) -> float:
        return self.fp16_bytes / self.size_bytes if self.size_bytes else math.inf

    @property
    def ratio_vs_fp32(self) -> float:
        return self.fp32_bytes / self.size_bytes if self.size_bytes else math.inf

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["ratio_vs_fp16"] = self.ratio_vs_fp16
        d["ratio_vs_fp32"] = self.ratio_vs_fp32
        return d

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs, in display order."""

        def counts(c: dict[str, int]) -> str:
            return ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) or "-"

        act = "-" if self.avg_activation_bits is None else f"{self.avg_activation_bits:.2f}"
        rows = [
            ("quantizable layers", str(self.num_layers)),
            ("layers by weight dtype", counts(self.weight_layers)),
            ("layers by activation dtype", counts(self.activation_layers)),
            ("parameters in these layers", f"{self.params:,}"),
            ("average weight bits (parameter-weighted)", f"{self.avg_weight_bits:.2f}"),
            ("average activation bits (quantized inputs)", act),
        ]
        if self.other_params:
            rows.append(("other parameters (kept in FP16)", f"{self.other_params:,}"))
        rows += [
            ("estimated size", _fmt_bytes(self.size_bytes)),
            ("FP16 size", f"{_fmt_bytes(self.fp16_bytes)} ({self.ratio_vs_fp16:.2f}x smaller)"),
            ("FP32 size", f"{_fmt_bytes(self.fp32_bytes)} ({self.ratio_vs_fp32:.2f}x smaller)"),
        ]
        return rows

    def __str__(self) -> str:
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


class BitPlan:
    """A per-layer bit-width plan (format v1).

    Build one with :meth:`load` (a path, a dict, JSON text), :meth:`uniform`, or the constructor; every way runs
    the same validation and raises :class:`~diffusers_mixdq.errors.PlanFormatError` on malformed input.
    """

    def __init__(
        self,
        *,
        target: Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
        rules: list[Mapping[str, Any]] | None = None,
        ignore: list[str] | None = None,
        layers: Mapping[str, Mapping[str, Any]] | None = None,
        provenance: Mapping[str, Any] | None = None,
        tensors: Mapping[str, Any] | None = None,
    ):
        self.target: dict[str, Any] = dict(target or {})
        self.defaults: dict[str, Any] | None = dict(defaults) if defaults is not None else None
        self.rules: list[dict[str, Any]] = [dict(r) for r in (rules or [])]
        self.ignore: list[str] = list(ignore or [])
        self.layers: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (layers or {}).items()}
        self.provenance: dict[str, Any] = copy.deepcopy(dict(provenance or {}))
        #: tensors carried beside the JSON (e.g. BOS rows), saved as a safetensors sidecar
        self.tensors: dict[str, Any] = dict(tensors or {})
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def uniform(
        cls,
        weights: str = "int8",
        activations: str = "none",
        act_range: float | str | None = None,
        ignore: list[str] | None = None,
        **kwargs,
    ) -> BitPlan:
        """The same precision for every layer (``act_range`` defaults to dynamic when activations are quantized)."""
        defaults: dict[str, Any] = {"weights": weights, "activations": activations}
        if activations != "none":
            defaults["act_range"] = DYNAMIC if act_range is None else act_range
        return cls(defaults=defaults, ignore=ignore, **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BitPlan:
        if not isinstance(data, Mapping):
            raise PlanFormatError(f"A plan must be a JSON object, got {type(data).__name__}.")
        _check_header(data)
        _check_schema(data)
        return cls(
            target=data.get("target"),
            defaults=data.get("defaults"),
            rules=data.get("rules"),
            ignore=data.get("ignore"),
            layers=data.get("layers"),
            provenance=data.get("provenance"),
        )

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> BitPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanFormatError(
                f"The plan {source} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
                "Fix the file (a plan is a JSON object as described in docs/plan-format.md)."
            ) from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, source: BitPlan | Mapping[str, Any] | str | os.PathLike) -> BitPlan:
        """A plan from a :class:`BitPlan` (copied), a dict, a JSON string, a ``.json`` file or a directory
        holding ``plan.json`` (and its safetensors sidecar, if the plan names one)."""
        if isinstance(source, BitPlan):
            return source.copy()
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        if isinstance(source, str) and source.lstrip().startswith("{"):
            return cls.from_json(source)
        path = Path(source)
        if path.is_dir():
            path = path / PLAN_FILENAME
        if not path.is_file():
            from ..errors import PlanSourceError

            raise PlanSourceError(
                f"No plan file at '{source}'. Pass a plan .json file, a directory containing {PLAN_FILENAME}, "
                "a dict or a BitPlan."
            )
        plan = cls.from_json(path.read_text(encoding="utf-8"), source=f"'{path}'")
        sidecar = _sidecar_name(path)
        if sidecar is not None:
            from .tensors import load_tensors

            plan.tensors = load_tensors(path.parent / sidecar)
        return plan

    def copy(self) -> BitPlan:
        new = BitPlan.from_dict(self.to_dict())
        new.tensors = dict(self.tensors)
        return new

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
        if self.target:
            out["target"] = copy.deepcopy(self.target)
        if self.defaults is not None:
            out["defaults"] = copy.deepcopy(self.defaults)
        if self.rules:
            out["rules"] = copy.deepcopy(self.rules)
        if self.ignore:
            out["ignore"] = list(self.ignore)
        if self.layers:
            out["layers"] = copy.deepcopy(self.layers)
        if self.tensors:
            out["tensors"] = PLAN_FILENAME.replace(".json", ".safetensors")
        if self.provenance:
            out["provenance"] = copy.deepcopy(self.provenance)
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan to ``path`` (a ``.json`` file, or a directory that receives ``plan.json``), and its
        tensors to the safetensors sidecar beside it. Returns the JSON file's path."""
        path = Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / PLAN_FILENAME
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if self.tensors:
            from .tensors import save_tensors

            sidecar = path.with_suffix(".safetensors").name
            data["tensors"] = sidecar
            save_tensors(self.tensors, path.parent / sidecar)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BitPlan) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        what = []
        if self.target.get("class_name"):
            what.append(self.target["class_name"])
        if self.defaults is not None:
            what.append(f"defaults={self.defaults}")
        if self.rules:
            what.append(f"{len(self.rules)} rules")
        if self.layers:
            what.append(f"{len(self.layers)} layers")
        return f"BitPlan({', '.join(what)})"

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check the plan against the format (schema and dtype vocabulary). Raises PlanFormatError."""
        _check_schema(self.to_dict())
        if self.target.get("layers") is not None:
            try:
                for info in self.target["layers"].values():
                    LayerInfo.from_json(info)
            except (TypeError, ValueError):
                raise PlanFormatError("target.layers must map layer names to [type, shape].") from None

    # ------------------------------------------------------------------ resolution
    @property
    def is_resolved(self) -> bool:
        """True for an explicit per-layer table with a layer manifest (what a quantized model carries)."""
        return (
            self.defaults is None
            and not self.rules
            and not self.ignore
            and bool(self.target.get("layers"))
            and set(self.layers) == set(self.target["layers"])
        )

    def manifest(self) -> dict[str, LayerInfo] | None:
        layers = self.target.get("layers")
        if not layers:
            return None
        return {name: LayerInfo.from_json(v) for name, v in layers.items()}

    def layer_specs(self) -> dict[str, LayerSpec]:
        """The per-layer table of a resolved plan."""
        if not self.is_resolved:
            raise PlanFormatError(
                "This plan is not resolved against a model yet; call plan.resolve(model) first."
            )
        return {name: _spec_from(entry) for name, entry in self.layers.items()}

    def resolve(
        self,
        model,
        strict: bool = True,
        extra_ignore: list[str] | tuple[str, ...] = (),
        act_ranges: Mapping[str, float] | None = None,
    ) -> BitPlan:
        """Resolve rules and defaults against ``model`` into an explicit per-layer plan.

        Checks the target class and fingerprint, that every explicitly named layer exists and is a Linear or
        Conv2d, and (``strict``) that the plan covers every quantizable layer and that every rule matches
        something. ``extra_ignore`` patterns keep more layers in floating point. ``act_ranges`` (e.g. from
        calibration) fills in the range of layers whose activations are quantized statically but have no
        ``act_range`` in the plan. ``model`` may live on the meta device. Raises :class:`~diffusers_mixdq.errors.PlanMismatchError` / ``PlanFormatError``.
        """
        table = layer_table(model)
        class_name = type(model).__name__
        self._check_target(class_name, table)

        problems: list[str] = []
        types = module_types(model)
        for name in self.layers:
            if name in table:
                continue
            if name in types:
                problems.append(
                    f"layer '{name}' is a {types[name]}, which cannot be quantized (only Linear and Conv2d can); "
                    "remove it from the plan"
                )
            else:
                problems.append(f"layer '{name}' does not exist in {class_name}")
        if problems:
            raise PlanMismatchError(_listing("The plan names layers that cannot be quantized", problems))

        resolved: dict[str, dict[str, Any]] = {}
        uncovered: list[str] = []
        rule_hits = Counter()
        ignore_patterns = list(self.ignore) + list(extra_ignore)
        for name in table:
            spec: dict[str, Any] = {}
            covered = self.defaults is not None
            if self.defaults is not None:
                spec.update(self.defaults)
            for i, rule in enumerate(self.rules):
                if any(_matches(p, name) for p in rule["targets"]):
                    rule_hits[i] += 1
                    covered = True
                    spec.update({k: v for k, v in rule.items() if k in SPEC_KEYS})
            if any(_matches(p, name) for p in ignore_patterns):
                covered = True
                spec = {"weights": "none", "activations": "none"}
            if name in self.layers:
                covered = True
                spec.update(self.layers[name])
            if not covered:
                uncovered.append(name)
                spec = {"weights": "none", "activations": "none"}
            resolved[name] = spec

        unused = [self.rules[i]["targets"] for i in range(len(self.rules)) if rule_hits[i] == 0]
        if unused:
            msg = _listing(
                f"These plan rules match no layer of {class_name} (check the patterns; globs match the full "
                "layer name, regexes need a 're:' prefix)",
                [str(t) for t in unused],
            )
            if strict:
                raise PlanMismatchError(msg + "Or pass strict=False to ignore them.")
            warnings.warn(msg, stacklevel=2)
        if uncovered:
            msg = _listing(
                f"The plan says nothing about {len(uncovered)} quantizable layer(s) of {class_name}",
                uncovered,
            )
            if strict:
                raise PlanMismatchError(
                    msg + "Add them to the plan (or give it 'defaults'), or pass strict=False to keep them in "
                    "floating point."
                )
            warnings.warn(msg + "They stay in floating point.", stacklevel=2)

        final: dict[str, dict[str, Any]] = {}
        no_range = []
        bos_dim = (self.target.get("bos") or {}).get("dim")
        bad_bos = []
        for name, raw in resolved.items():
            flags = dict(raw.get("flags") or {})
            if (
                bos_dim
                and "bos_aware" not in flags
                and table[name].type == "Linear"
                and table[name].in_features == bos_dim
                and any(_matches(p, name) for p in BOS_DEFAULT_PATTERNS)
            ):
                flags["bos_aware"] = True
            if flags.get("bos_aware"):
                if table[name].type != "Linear" or table[name].in_features != bos_dim:
                    bad_bos.append(
                        f"'{name}' ({table[name].type}, {table[name].in_features} inputs; plan BOS state: "
                        f"{bos_dim or 'none'})"
                    )
            raw = {**raw, "flags": flags} if flags else {k: v for k, v in raw.items() if k != "flags"}
            if act_ranges and raw.get("activations", "none") != "none" and raw.get("act_range") is None:
                if name in act_ranges:
                    raw = {**raw, "act_range": float(act_ranges[name])}
            spec = _spec_from(raw)
            if not spec.is_quantized and spec.flags.get("bos_aware"):
                spec = LayerSpec(spec.weights, spec.activations, spec.act_range,
                                 {k: v for k, v in spec.flags.items() if k != "bos_aware"})
            if spec.activations != "none" and spec.act_range is None:
                no_range.append(name)
            final[name] = spec.to_dict()
        if bad_bos:
            raise PlanMismatchError(
                _listing("These layers are flagged BOS-aware but cannot be (BOS-aware layers are Linear layers that "
                         "read the text encoder's hidden states, and the plan must carry that encoder's BOS state)",
                         bad_bos)
                + "Attach the BOS state with diffusers_mixdq.bos.attach_bos(), or remove the flag."
            )
        if no_range:
            raise PlanFormatError(
                _listing("Static activation quantization needs a range, and these layers have none", no_range)
                + "Give each an 'act_range' (the absolute max of its input, from calibration) or set "
                "act_range to \"dynamic\"."
            )

        target = dict(self.target)
        target["class_name"] = class_name
        target["fingerprint"] = fingerprint(table)
        target["layers"] = {name: info.to_json() for name, info in table.items()}
        plan = BitPlan(target=target, layers=final, provenance=self.provenance)
        plan.tensors = dict(self.tensors)
        return plan

    def _check_target(self, class_name: str, table: dict[str, LayerInfo]) -> None:
        want_class = self.target.get("class_name")
        if want_class and want_class != class_name:
            raise PlanMismatchError(
                f"This plan was made for a {want_class}, but it is being applied to a {class_name}. Use a plan "
                f"built for this model (or build one with `mixdq build`)."
            )
        want = self.target.get("fingerprint")
        if want and want != fingerprint(table):
            manifest = self.manifest()
            detail = table_differences(manifest, table) if manifest is not None else []
            base = self.target.get("base_model")
            raise PlanMismatchError(
                "This plan was made for another architecture: the model's layers do not match the plan's "
                "fingerprint"
                + (f" (plan built for {base})" if base else "")
                + (":\n  - " + "\n  - ".join(detail) if detail else ".")
                + "\nUse a plan built for this model."
            )

    # ------------------------------------------------------------------ reporting
    def summary(self, model=None) -> PlanSummary:
        """Layers per width, parameter-weighted average weight bits and estimated size vs FP16 / FP32.

        A resolved plan summarises itself; otherwise pass the ``model`` to resolve against (non-strict). With a
        model, its parameters outside the quantizable layers are counted at FP16 / FP32 in the sizes too.
        """
        plan = self
        other = 0
        if model is not None:
            plan = self if self.is_resolved else self.resolve(model, strict=False)
            quantizable = set(layer_table(model))
            for mname, module in model.named_modules():
                for pname, p in module.named_parameters(recurse=False):
                    if mname in quantizable and pname == "weight":
                        continue
                    other += p.numel()
        elif not self.is_resolved:
            raise PlanFormatError(
                "This plan has rules or defaults, so its summary depends on the model: pass the model "
                "(plan.summary(model)) or resolve it first (`mixdq inspect PLAN --model PATH`)."
            )
        specs = plan.layer_specs()
        manifest = plan.manifest()
        params = sum(manifest[n].numel for n in specs)
        w_bits = 0.0
        size_bits = 0.0
        act_elems = Counter()
        for name, spec in specs.items():
            info = manifest[name]
            w_bits += (spec.weight_bits or 16) * info.numel
            size_bits += storage_bits_per_weight(spec.weights, info) * info.numel
            if spec.activation_bits:
                act_elems[spec.activation_bits] += info.in_features
        act_total = sum(act_elems.values())
        avg_act = sum(b * n for b, n in act_elems.items()) / act_total if act_total else None
        return PlanSummary(
            num_layers=len(specs),
            weight_layers=dict(Counter(s.weights for s in specs.values())),
            activation_layers=dict(Counter(s.activations for s in specs.values())),
            params=params,
            avg_weight_bits=w_bits / params if params else 0.0,
            avg_activation_bits=avg_act,
            size_bytes=(size_bits + 16 * other) / 8,
            fp16_bytes=2 * (params + other),
            fp32_bytes=4 * (params + other),
            other_params=other,
        )


def _spec_from(raw: Mapping[str, Any]) -> LayerSpec:
    return LayerSpec(
        weights=raw.get("weights", "none"),
        activations=raw.get("activations", "none"),
        act_range=raw.get("act_range") if raw.get("activations", "none") != "none" else None,
        flags=dict(raw.get("flags") or {}),
    )


def _listing(head: str, items: list[str], limit: int = 8) -> str:
    shown = items[:limit]
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{head}:\n  - " + "\n  - ".join(shown) + more + "\n"


def _sidecar_name(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    name = data.get("tensors") if isinstance(data, dict) else None
    return name or None


def _check_header(data: Mapping[str, Any]) -> None:
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
    import jsonschema

    _check_header(data)
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    lines = []
    for err in errors[:5]:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        lines.append(f"{where}: {_explain(err)}")
    raise PlanFormatError(
        "The plan does not follow plan format v1:\n  - " + "\n  - ".join(lines) + "\nSee docs/plan-format.md."
    )


def _explain(err) -> str:
    path = list(err.absolute_path)
    key = path[-1] if path else None
    if key == "weights" and err.validator == "enum":
        return f"unknown weight dtype {err.instance!r}; use one of {', '.join(WEIGHT_DTYPES)}"
    if key == "activations" and err.validator == "enum":
        return f"unknown activation dtype {err.instance!r}; use one of {', '.join(ACTIVATION_DTYPES)}"
    if key == "act_range":
        return f"act_range must be a positive number (absolute max) or \"dynamic\", got {err.instance!r}"
    if err.validator == "unevaluatedProperties" or err.validator == "additionalProperties":
        return err.message.replace("Unevaluated properties are not allowed", "unknown field(s)")
    return err.message
