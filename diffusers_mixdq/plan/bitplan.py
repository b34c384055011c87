""":class:`BitPlan`, the Python face of plan format v1: data plus the verbs, each delegated to its module.

Vocabulary in :mod:`.spec`, validation in :mod:`.validation` (run once per load or construction), files in
:mod:`.files`, resolution against a model in :mod:`.resolve`, summaries in :mod:`.summary`. The format is JSON,
documented in ``docs/plan-format.md``; tensors ride in a safetensors sidecar, never pickle.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import PlanFormatError
from . import files, validation
from .layers import LayerInfo, layer_table
from .resolve import resolve_plan
from .tensors import check_tensors
from .spec import DYNAMIC, FORMAT_NAME, FORMAT_VERSION, LayerSpec
from .embeddings import embedding_storage
from .summary import PlanSummary, params_outside, summarize

#: the top-level fields of a plan that the constructor takes, in file order (``format`` / ``version`` aside)
_FIELDS = ("target", "defaults", "rules", "ignore", "layers", "provenance", "embeddings")


class BitPlan:
    """A per-layer bit-width plan (format v1).

    Build one with :meth:`load` (a path, a dict, JSON text), :meth:`uniform`, or the constructor; every way runs
    the same validation, once, and raises :class:`~diffusers_mixdq.errors.PlanFormatError` on malformed input.
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
        embeddings: Mapping[str, Any] | None = None,
    ):
        given = dict(zip(_FIELDS, (target, defaults, rules, ignore, layers, provenance, embeddings)))
        data = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **{k: v for k, v in given.items() if v is not None}}
        data = validation.validate_plan_data(data)
        self._assign(*(data.get(key) for key in _FIELDS), tensors=None)
        self.tensors = check_tensors(self.target, dict(tensors or {}), layers=self.layers)

    def _assign(self, target, defaults, rules, ignore, layers, provenance, embeddings, tensors) -> None:
        self.target: dict[str, Any] = dict(target or {})
        self.defaults: dict[str, Any] | None = dict(defaults) if defaults is not None else None
        self.rules: list[dict[str, Any]] = [dict(r) for r in (rules or [])]
        self.ignore: list[str] = list(ignore or [])
        self.layers: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (layers or {}).items()}
        self.provenance: dict[str, Any] = copy.deepcopy(dict(provenance or {}))
        #: the embedding tables' storage (``{"weights": "int8"}``; ``None``: floating point), see .embeddings
        self.embeddings: dict[str, Any] | None = dict(embeddings) if embeddings else None
        #: tensors carried beside the JSON (e.g. BOS rows), saved as a safetensors sidecar
        self.tensors: dict[str, Any] = dict(tensors or {})

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
        """A plan from its JSON data, validated once (header, schema, manifest)."""
        data = validation.validate_plan_data(data)
        plan = cls.__new__(cls)
        plan._assign(*(data.get(key) for key in _FIELDS), tensors=None)
        return plan

    @classmethod
    def _trusted(cls, tensors: Mapping[str, Any], **fields: Any) -> BitPlan:
        """A plan from parts that are already valid (a resolution of a validated plan): not validated again."""
        plan = cls.__new__(cls)
        plan._assign(*(fields.get(key) for key in _FIELDS), tensors=tensors)
        return plan

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> BitPlan:
        return cls.from_dict(files.parse_json(text, source))

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
        path = files.plan_file(source)
        data = files.read_plan_file(path)
        plan = cls.from_dict(data)
        plan.tensors = check_tensors(plan.target, files.read_sidecar(path, data), f"beside {path}", plan.layers)
        return plan

    @classmethod
    def from_mixdq(cls, weights, activations=None, act_range: float | str = "dynamic", prefix: str = "model.",
                   keep_fp=None, provenance: Mapping[str, Any] | None = None) -> BitPlan:
        """A plan from the MixDQ authors' published ``{layer: bits}`` YAML maps (each a path, an http(s) URL or a
        dict); layers in neither map stay in floating point, and so do those of ``keep_fp`` (their "act protect"
        list). See docs/plan-format.md, "MixDQ's published maps"."""
        from .mixdq_maps import plan_dict_from_mixdq

        return cls.from_dict(plan_dict_from_mixdq(weights, activations, act_range=act_range, prefix=prefix,
                                                  provenance=provenance, keep_fp=keep_fp))

    def to_mixdq(self, model=None, weights=None, activations=None, prefix: str = "model.",
                 keep_fp=None) -> tuple[dict, dict]:
        """This plan as MixDQ's ``(weight map, activation map)``, also written as YAML files when ``weights`` /
        ``activations`` paths are given; ``keep_fp`` (a path) also writes the layers kept fully in floating point
        as their "act protect" list, with their published widths back in the maps. A plan with rules needs
        ``model`` to resolve against."""
        from .mixdq_maps import plan_to_mixdq, write_map

        *maps, fp = plan_to_mixdq(self, model=model, prefix=prefix, keep_fp=keep_fp is not None)
        for data, path in zip((*maps, fp), (weights, activations, keep_fp)):
            if path is not None:
                write_map(data, path)
        return maps[0], maps[1]

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
            out["tensors"] = files.SIDECAR_FILENAME
        if self.provenance:
            out["provenance"] = copy.deepcopy(self.provenance)
        if self.embeddings:
            out["embeddings"] = dict(self.embeddings)
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan to ``path`` (a ``.json`` file, or a directory that receives ``plan.json``), and its
        tensors to the safetensors sidecar beside it. Returns the JSON file's path."""
        return files.write_plan_file(self.to_dict(), self.tensors, path)

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
        """Check the plan against the format (schema, dtype vocabulary, patterns) and its tensors against the
        hashes the plan records. Raises PlanFormatError."""
        validation.validate_plan_data(self.to_dict())
        check_tensors(self.target, self.tensors, layers=self.layers)

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
        return {name: LayerSpec.from_dict(entry) for name, entry in self.layers.items()}

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
        ``act_range`` in the plan. ``model`` may live on the meta device.
        Raises :class:`~diffusers_mixdq.errors.PlanMismatchError` / ``PlanFormatError``.
        """
        resolution = resolve_plan(self, model, strict, extra_ignore, act_ranges)
        return BitPlan._trusted(self.tensors, target=resolution.target, layers=resolution.layers,
                                provenance=self.provenance, embeddings=self.embeddings)

    # ------------------------------------------------------------------ reporting
    def summary(self, model=None) -> PlanSummary:
        """Layers per width, parameter-weighted average weight bits and estimated size vs FP16 / FP32.

        A resolved plan summarises itself; otherwise pass the ``model`` to resolve against (non-strict). With a
        model, its parameters outside the quantizable layers are counted at FP16 / FP32 in the sizes too.
        """
        if model is None and not self.is_resolved:
            raise PlanFormatError(
                "This plan has rules or defaults, so its summary depends on the model: pass the model "
                "(plan.summary(model)) or resolve it first (`mixdq inspect PLAN --model PATH`)."
            )
        plan = self if self.is_resolved else self.resolve(model, strict=False)
        other = params_outside(model, set(layer_table(model))) if model is not None else 0
        tables = embedding_storage(model, self.embeddings) if model is not None else (0, 0.0)
        return summarize(plan.layer_specs(), plan.manifest(), other, tables)
