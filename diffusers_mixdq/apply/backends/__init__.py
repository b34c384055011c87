"""Weight backends: how a layer's quantized weight is stored, loaded and run.

A backend is a :class:`WeightBackend` registered in :data:`diffusers_mixdq.registry.WEIGHT_BACKENDS`. optimum-quanto
is one implementation (``backends/quanto``), the only code that imports it. A second backend is one new module
(or package) ``backends/<name>`` that subclasses :class:`WeightBackend` (see its docstring) and registers an
instance, ``WEIGHT_BACKENDS.register("<name>", MyBackend())``: every module of this folder is imported here, so
nothing else changes. The quantizer uses :func:`default_backend` (``registry.DEFAULT_WEIGHT_BACKEND``); modules are
read back through the backend that made them (:func:`backend_of`).
"""

from __future__ import annotations

import pkgutil
from importlib import import_module

from ... import registry
from .base import WeightBackend

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        import_module(f".{_info.name}", __name__)  # each registers its backend (without importing its library)


def default_backend() -> WeightBackend:
    return registry.WEIGHT_BACKENDS.get(registry.DEFAULT_WEIGHT_BACKEND)


def backend_of(module) -> WeightBackend | None:
    """The backend that made a MixDQ module (``None`` for any other module)."""
    name = getattr(module, "mixdq_backend", None)
    return registry.WEIGHT_BACKENDS.get(name) if name else None


__all__ = ["WeightBackend", "backend_of", "default_backend"]
