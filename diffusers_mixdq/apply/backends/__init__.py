"""Weight backends: how a layer's quantized weight is stored, loaded and run.

A backend is a :class:`WeightBackend` registered in :data:`diffusers_mixdq.registry.WEIGHT_BACKENDS`. optimum-quanto
is one implementation (``backends/quanto``), the only code that imports it; a second backend is one new module that
subclasses :class:`WeightBackend` and registers itself.
"""

from __future__ import annotations

from ...registry import DEFAULT_WEIGHT_BACKEND, WEIGHT_BACKENDS
from .base import WeightBackend
from .quanto import QuantoBackend

WEIGHT_BACKENDS.register("quanto", QuantoBackend())


def default_backend() -> WeightBackend:
    return WEIGHT_BACKENDS.get(DEFAULT_WEIGHT_BACKEND)


__all__ = ["WeightBackend", "default_backend"]
