"""What a resolved plan amounts to: layers per dtype, average bits and estimated sizes (:class:`PlanSummary`).

Units: sizes are byte counts in fields (``*_bytes``) and are displayed in binary units labelled as such (KiB, MiB,
GiB: powers of 1024). Stored sizes come from the default weight backend, which alone knows its storage layout.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from torch import nn

from .. import registry
from .extras import outlier_bits
from .layer_tensors import extra_bits
from .layers import LayerInfo
from .spec import WEIGHT_DTYPES, LayerSpec

#: bits of a weight kept in floating point, and of quantization scales, in the size estimates
FLOAT_BITS = 16
BINARY_UNITS = ("B", "KiB", "MiB", "GiB")


def storage_bits_per_weight(dtype: str, info: LayerInfo, float_bits: int = FLOAT_BITS) -> float:
    """Estimated stored bits per weight element, quantization metadata included, as the default weight backend
    lays the weight out (``none``: the floating-point dtype itself)."""
    backend = registry.WEIGHT_BACKENDS.get(registry.DEFAULT_WEIGHT_BACKEND)  # looked up now: it can be changed
    return backend.storage_bits(dtype, WEIGHT_DTYPES[dtype], info.in_features, float_bits)


def format_bytes(n: float) -> str:
    """A byte count in binary units, labelled as such (``"1.50 MiB"``)."""
    for unit in BINARY_UNITS[:-1]:
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} {BINARY_UNITS[-1]}"


@dataclass
class PlanSummary:
    """Counts and size estimates for a resolved plan (see :meth:`BitPlan.summary`).

    ``avg_activation_bits_by_inputs`` averages the activation bits of the layers whose inputs are quantized,
    weighted by each layer's input features (``in_features``; ``in/groups * kh * kw`` for Conv2d), not by the
    number of activation elements at run time (which depends on the resolution; the builder reports that one).
    ``size_bytes``, ``fp16_bytes`` and ``fp32_bytes`` are byte counts. ``avg_weight_bits`` and ``size_bytes``
    include the layers' channel-balancing and low-rank factors (:func:`~.layer_tensors.extra_bits`).
    """

    num_layers: int
    weight_layers: dict[str, int]
    activation_layers: dict[str, int]
    params: int
    avg_weight_bits: float
    avg_activation_bits_by_inputs: float | None
    size_bytes: float
    fp16_bytes: float
    fp32_bytes: float
    other_params: int = 0
    #: layers per method stage the plan records (``static`` / ``dynamic`` / ``dynamic-token`` activation ranges,
    #: ``act_groups``, ``outliers`` and each flag such as ``balance``); stages no layer uses are left out
    methods: dict[str, int] = field(default_factory=dict)
    #: parameters of the embedding tables the plan stores at int8 (part of ``other_params``; see .embeddings)
    int8_embedding_params: int = 0

    @property
    def avg_activation_bits(self) -> float | None:
        """Former name of :attr:`avg_activation_bits_by_inputs` (kept for existing callers)."""
        return self.avg_activation_bits_by_inputs

    @property
    def ratio_vs_fp16(self) -> float:
        return self.fp16_bytes / self.size_bytes if self.size_bytes else math.inf

    @property
    def ratio_vs_fp32(self) -> float:
        return self.fp32_bytes / self.size_bytes if self.size_bytes else math.inf

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["avg_activation_bits"] = self.avg_activation_bits  # the former key, for readers of `mixdq inspect --json`
        d["ratio_vs_fp16"] = self.ratio_vs_fp16
        d["ratio_vs_fp32"] = self.ratio_vs_fp32
        return d

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs, in display order."""
        act = self.avg_activation_bits_by_inputs
        rows = [
            ("quantizable layers", str(self.num_layers)),
            ("layers by weight dtype", _counts(self.weight_layers)),
            ("layers by activation dtype", _counts(self.activation_layers)),
            ("parameters in these layers", f"{self.params:,}"),
            ("average weight bits (parameter-weighted)", f"{self.avg_weight_bits:.2f}"),
            ("average activation bits (input-feature-weighted)", "-" if act is None else f"{act:.2f}"),
        ]
        if self.methods:
            rows.append(("layers by method stage", _counts(self.methods)))
        if self.other_params:
            rows.append(("other parameters (kept in FP16)", f"{self.other_params - self.int8_embedding_params:,}"))
        if self.int8_embedding_params:
            rows.append(("embedding-table parameters (int8 rows)", f"{self.int8_embedding_params:,}"))
        rows += [
            ("estimated size", format_bytes(self.size_bytes)),
            ("FP16 size", f"{format_bytes(self.fp16_bytes)} ({self.ratio_vs_fp16:.2f}x smaller)"),
            ("FP32 size", f"{format_bytes(self.fp32_bytes)} ({self.ratio_vs_fp32:.2f}x smaller)"),
        ]
        return rows

    def __str__(self) -> str:
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _counts(c: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) or "-"


def summarize(specs: Mapping[str, LayerSpec], manifest: Mapping[str, LayerInfo], other_params: int = 0,
              int8_tables: tuple[int, float] = (0, 0.0)) -> PlanSummary:
    """The summary of a resolved per-layer table; ``other_params`` (parameters outside these layers) are counted
    at 16 bits in ``size_bytes`` and in the FP16 / FP32 sizes, except the ``int8_tables`` ``(parameters, stored
    bits)`` among them: embedding tables stored at int8 (:func:`.embeddings.embedding_storage`)."""
    params = sum(manifest[n].numel for n in specs)
    weight_bits = 0.0
    size_bits = 0.0
    act_inputs: Counter = Counter()
    for name, spec in specs.items():
        info = manifest[name]
        extra = extra_bits(spec.flags, info)  # balancing factors and low-rank factors, stored with the weight
        stored = info.numel
        if spec.outliers:  # rows stored apart at int8, not at the layer's width (plan.extras): counted once
            extra += outlier_bits(spec, info.in_features)
            stored -= len(spec.outlier_channels) * (info.numel // info.shape[0])
        weight_bits += (spec.weight_bits or FLOAT_BITS) * stored + extra
        size_bits += storage_bits_per_weight(spec.weights, info) * stored + extra
        if spec.activation_bits:
            act_inputs[spec.activation_bits] += info.in_features
    act_total = sum(act_inputs.values())
    return PlanSummary(
        num_layers=len(specs),
        weight_layers=dict(Counter(s.weights for s in specs.values())),
        activation_layers=dict(Counter(s.activations for s in specs.values())),
        params=params,
        avg_weight_bits=weight_bits / params if params else 0.0,
        avg_activation_bits_by_inputs=sum(b * n for b, n in act_inputs.items()) / act_total if act_total else None,
        size_bytes=(size_bits + FLOAT_BITS * (other_params - int8_tables[0]) + int8_tables[1]) / 8,
        fp16_bytes=2 * (params + other_params),
        fp32_bytes=4 * (params + other_params),
        other_params=other_params,
        methods=method_counts(specs.values()),
        int8_embedding_params=int8_tables[0],
    )


def method_counts(specs: Iterable[LayerSpec]) -> dict[str, int]:
    """How many layers use each activation-range scheme and each method stage (see :attr:`PlanSummary.methods`)."""
    counts: Counter = Counter()
    for spec in specs:
        if spec.activations != "none":
            counts[spec.act_range if isinstance(spec.act_range, str) else "static ranges"] += 1
        counts.update(name for name, on in (("act_groups", spec.act_groups), ("outliers", spec.outliers)) if on)
        counts.update(name for name, value in spec.flags.items() if value is not False and value is not None)
    return dict(counts)


def params_outside(model: nn.Module, quantizable: set[str]) -> int:
    """Parameters of ``model`` other than the weights of the ``quantizable`` layers (biases included); a tensor
    shared by several modules (tied embeddings) counts once."""
    other = 0
    seen: set[int] = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not (mname in quantizable and pname == "weight") and id(p) not in seen:
                seen.add(id(p))
                other += p.numel()
    return other
