"""The plan's vocabulary: format constants, weight / activation dtypes, BOS constants and :class:`LayerSpec`.

A plan says, for each Linear / Conv2d layer of a diffusers denoiser, how its weights are stored (int8, int6, int5,
int4, int3, int2, float8 or kept in floating point) and how its input activations are quantized (int8, int4, float8 or not at all, with
a static absolute-max range or a dynamic one). This module holds the words of that sentence; the JSON Schema
(``plan-v1.schema.json``) spells the same vocabulary for files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..families import GENERIC

FORMAT_NAME = "diffusers-mixdq-plan"
FORMAT_VERSION = 1
PLAN_FILENAME = "plan.json"

#: weight dtype -> bits per stored element (``None``: kept in the model's floating-point dtype)
WEIGHT_DTYPES: dict[str, int | None] = {"int8": 8, "int6": 6, "int5": 5, "int4": 4, "int3": 3, "int2": 2, "float8": 8,
                                         "none": None}
#: weight dtypes only the native weight backend stores (quanto has no 3 / 5 / 6-bit types)
NATIVE_ONLY_WEIGHT_DTYPES = ("int6", "int5", "int3")
#: activation dtype -> bits (``None``: not quantized)
ACTIVATION_DTYPES: dict[str, int | None] = {"int8": 8, "int4": 4, "float8": 8, "none": None}
DYNAMIC = "dynamic"
#: ``act_range`` of a layer whose input is quantized with one run-time scale per token (ViDiT-Q)
DYNAMIC_TOKEN = "dynamic-token"
#: the ``act_range`` values computed at run time (each the name of its activation scheme)
DYNAMIC_RANGES = (DYNAMIC, DYNAMIC_TOKEN)
#: the keys of a layer spec (a rule also has ``targets`` and ``note``); ``act_groups``: static ranges per timestep
#: group, ``outliers``: output channels kept in a wider weight format (see docs/plan-format.md)
SPEC_KEYS = ("weights", "activations", "act_range", "flags", "act_groups", "outliers")
#: the spec of a layer kept in floating point
NOT_QUANTIZED: Mapping[str, str] = {"weights": "none", "activations": "none"}

#: sidecar key of the text encoder's BOS hidden state (see diffusers_mixdq.bos)
BOS_STATE_KEY = "bos.hidden_state"
#: layers that read the text encoder's hidden states in the generic model family; BOS-aware by default when the
#: plan carries a BOS state. Resolution asks the model's own family (``family_of(model).text_kv``).
BOS_DEFAULT_PATTERNS: tuple[str, ...] = GENERIC.text_kv
#: a token-0 input counts as the recorded BOS state when ||x0 - h|| <= BOS_MATCH_TOLERANCE * ||h||
BOS_MATCH_TOLERANCE = 2e-2


@dataclass(frozen=True)
class LayerSpec:
    """The resolved precision of one layer."""

    weights: str = "none"
    activations: str = "none"
    act_range: float | str | None = None
    flags: Mapping[str, Any] = field(default_factory=dict)
    #: ``((t_lo, t_hi, absmax), ...)``: static input ranges per timestep group (``act_range`` outside them)
    act_groups: tuple[tuple[float, float, float], ...] | None = None
    #: ``{"weights": "int8", "channels": [...]}``: output channels stored in a wider format than the layer
    outliers: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LayerSpec:
        """A spec from a plan entry (missing keys: not quantized; ``act_range`` only with quantized inputs)."""
        activations, weights = raw.get("activations", "none"), raw.get("weights", "none")
        groups = raw.get("act_groups") if activations != "none" else None
        groups = tuple(tuple(float(v) for v in g) for g in groups) if groups else None
        act_range = raw.get("act_range") if activations != "none" else None
        if act_range is None and groups:  # outside every group: the widest group's range
            act_range = max(g[2] for g in groups)
        outliers = raw.get("outliers") if weights != "none" else None
        return cls(
            weights=weights,
            activations=activations,
            act_range=act_range,
            flags=dict(raw.get("flags") or {}),
            act_groups=groups,
            outliers=dict(outliers) if outliers else None,
        )

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
        """Whether the input range is computed at run time (per tensor or per token)."""
        return self.act_range in DYNAMIC_RANGES

    @property
    def outlier_channels(self) -> list[int]:
        return list(self.outliers["channels"]) if self.outliers else []

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"weights": self.weights, "activations": self.activations}
        if self.activations != "none":
            out["act_range"] = self.act_range
        if self.flags:
            out["flags"] = dict(self.flags)
        if self.act_groups:
            out["act_groups"] = [list(g) for g in self.act_groups]
        if self.outliers:
            out["outliers"] = {**self.outliers, "channels": list(self.outliers["channels"])}
        return out
