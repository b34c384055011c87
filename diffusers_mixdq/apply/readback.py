"""Read back what a loaded model actually holds, layer by layer (for tests, CLI and users)."""

from __future__ import annotations

from torch import nn

from ..plan import layer_table
from .convert import describe


def quantized_layers(model: nn.Module) -> dict[str, tuple[str, str]]:
    """``{layer name: (weight dtype, activation dtype)}`` for every Linear / Conv2d of ``model``, in plan
    vocabulary (``"none"`` for layers kept in floating point)."""
    return {name: describe(model.get_submodule(name)) for name in layer_table(model)}
