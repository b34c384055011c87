"""What a model offers to quantize: its Linear / Conv2d layers, their shapes, and a structural fingerprint.

Works on real and on meta-device models alike (only names, types and shapes are read), so a plan can be checked
against a model before any weight is loaded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer: ``type`` is ``"Linear"`` or ``"Conv2d"``, ``shape`` the weight's shape."""

    type: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def in_features(self) -> int:
        """Elements reduced per output channel (``in`` for Linear, ``in/groups * kh * kw`` for Conv2d)."""
        return self.numel // self.shape[0] if self.shape and self.shape[0] else 0

    def to_json(self) -> list:
        return [self.type, list(self.shape)]

    @classmethod
    def from_json(cls, value) -> LayerInfo:
        kind, shape = value
        return cls(str(kind), tuple(int(s) for s in shape))


def layer_type_name(module: nn.Module) -> str | None:
    """``"Linear"`` / ``"Conv2d"`` for quantizable modules (subclasses included), else ``None``."""
    if isinstance(module, nn.Linear):
        return "Linear"
    if isinstance(module, nn.Conv2d):
        return "Conv2d"
    return None


def layer_table(model: nn.Module) -> dict[str, LayerInfo]:
    """Every quantizable layer of ``model`` by qualified name, in module order."""
    table = {}
    for name, module in model.named_modules():
        kind = layer_type_name(module)
        if kind is None or not name:
            continue
        weight = module.weight
        table[name] = LayerInfo(kind, tuple(int(s) for s in weight.shape))
    return table


def fingerprint(table: dict[str, LayerInfo]) -> str:
    """A hash of the quantizable layers' names, types and weight shapes (order-independent)."""
    lines = [f"{name}:{info.type}:{'x'.join(map(str, info.shape))}" for name, info in sorted(table.items())]
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def table_differences(expected: dict[str, LayerInfo], actual: dict[str, LayerInfo], limit: int = 5) -> list[str]:
    """Human-readable differences between a plan's layer manifest and a model's layers (first ``limit``)."""
    diffs: list[str] = []
    for name, info in expected.items():
        other = actual.get(name)
        if other is None:
            diffs.append(f"plan has {info.type} '{name}' {list(info.shape)}, the model does not")
        elif other != info:
            diffs.append(
                f"'{name}' is {info.type} {list(info.shape)} in the plan but {other.type} {list(other.shape)} "
                "in the model"
            )
    for name, info in actual.items():
        if name not in expected:
            diffs.append(f"model has {info.type} '{name}' {list(info.shape)}, the plan does not")
    total = len(diffs)
    if total > limit:
        diffs = diffs[:limit] + [f"... and {total - limit} more"]
    return diffs


def module_types(model: nn.Module) -> dict[str, str]:
    """Class name of every named module (used to say why a named layer cannot be quantized)."""
    return {name: type(module).__name__ for name, module in model.named_modules() if name}


def is_meta(model: nn.Module) -> bool:
    return any(p.device == torch.device("meta") for p in model.parameters())
