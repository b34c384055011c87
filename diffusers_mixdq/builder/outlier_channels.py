"""The outlier-widths stage (MPQ-DM's outlier-driven mixed quantization, OMQ): in each layer with int4 / int2
weights, the output channels whose weights are most outlier-heavy (highest kurtosis E[(w-mu)^4] / sigma^4 of the
row) keep an int8 copy of their row (:mod:`diffusers_mixdq.apply.outliers`); the plan records their indices.
Kurtosis is taken of the weight the layer quantizes: after the correct stage, ``W diag(s) - up @ down``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..apply.corrections import corrected_weight
from ..plan import BitPlan
from ..plan.extras import OUTLIER_BASE_DTYPES
from ..plan.layer_tensors import BALANCE, LOWRANK, balance_key, lowrank_keys
from .timestep_ranges import with_layers


def kurtosis(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel (row), the kurtosis of its weights (3 for a Gaussian; heavy tails score higher)."""
    w = weight.detach().flatten(1).double()
    centred = w - w.mean(dim=1, keepdim=True)
    var = centred.pow(2).mean(dim=1)
    return (centred.pow(4).mean(dim=1) / var.pow(2).clamp_min(1e-30)).float()


def outlier_channels(weight: torch.Tensor, fraction: float) -> list[int]:
    """The ``ceil(fraction * rows)`` rows of highest kurtosis, in ascending order."""
    k = min(weight.shape[0], max(1, math.ceil(fraction * weight.shape[0])))
    return sorted(kurtosis(weight).topk(k).indices.tolist())


def quantized_weight(plan: BitPlan, name: str, spec: dict[str, Any], weight: torch.Tensor) -> torch.Tensor:
    """The weight layer ``name`` quantizes: ``weight`` balanced and less its low-rank part where ``spec``'s flags
    say so (their tensors in ``plan.tensors``)."""
    flags = spec.get("flags") or {}
    balance = plan.tensors.get(balance_key(name)) if flags.get(BALANCE) else None
    down, up = (plan.tensors.get(k) for k in lowrank_keys(name)) if flags.get(LOWRANK) else (None, None)
    return corrected_weight(weight, balance, down, up) if balance is not None or down is not None else weight


def outlier_stage(plan: BitPlan, denoiser: nn.Module, fraction: float) -> BitPlan:
    """``plan`` (resolved) with ``outliers`` on every int4 / int2 layer (ungrouped Conv2d or Linear)."""
    if fraction <= 0:
        return plan
    layers: dict[str, dict[str, Any]] = {}
    for name, spec in plan.layers.items():
        module = denoiser.get_submodule(name)
        if spec.get("weights") in OUTLIER_BASE_DTYPES and getattr(module, "groups", 1) == 1:
            channels = outlier_channels(quantized_weight(plan, name, spec, module.weight), fraction)
            spec = {**spec, "outliers": {"weights": "int8", "channels": channels, "kurtosis_fraction": fraction}}
        layers[name] = spec
    return with_layers(plan, layers)
