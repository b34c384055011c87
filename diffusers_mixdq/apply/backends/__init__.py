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
from contextlib import contextmanager
from contextvars import ContextVar
from importlib import import_module
from typing import Iterable

from ... import registry
from ...errors import MixDQError
from .base import WeightBackend

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "layout"):
        import_module(f".{_info.name}", __name__)  # each registers its backend (without importing its library)


#: the backend :func:`use_weight_backend` imposes in this context (``None``: none imposed)
_IMPOSED: ContextVar[str | None] = ContextVar("mixdq_weight_backend", default=None)


def default_backend() -> WeightBackend:
    return registry.WEIGHT_BACKENDS.get(registry.DEFAULT_WEIGHT_BACKEND)


def backend_named(name: str | None = None) -> WeightBackend:
    """The backend to make modules with: the one :func:`use_weight_backend` imposes, else ``name`` (a config's
    ``weight_backend``), else the default."""
    chosen = _IMPOSED.get() or name
    return registry.WEIGHT_BACKENDS.get(chosen) if chosen else default_backend()


def backend_for(name: str | None, specs: Iterable) -> WeightBackend:
    """The backend for layers of ``specs`` (:class:`~diffusers_mixdq.plan.LayerSpec`): :func:`backend_named`'s pick
    when it stores them all. When nothing names a backend and the default cannot store some (int3 / int5 / int6
    weights, outlier channels stored once: not on quanto), the first registered backend that stores them all (the
    native one); a backend picked by name that cannot: :class:`MixDQError`."""
    backend, specs = backend_named(name), list(specs)
    missing = sorted({m for m in map(backend.lacks, specs) if m})
    if not missing:
        return backend
    if not (_IMPOSED.get() or name):
        able = registry.WEIGHT_BACKENDS.find(lambda b: not any(map(b.lacks, specs)))
        if able is not None:
            return able
    raise MixDQError(f"The plan has {', '.join(missing)}, which the {backend.name!r} weight backend cannot "
                     "store. Use weight_backend=\"native\" (MixDQConfig(..., weight_backend=\"native\") or "
                     "diffusers_mixdq.use_weight_backend(\"native\")), or change those layers' entries.")


@contextmanager
def use_weight_backend(name: str):
    """Make every model loaded or quantized inside the ``with`` block use weight backend ``name``, whatever its
    config says (e.g. a checkpoint saved with the quanto backend, loaded into the native one)."""
    registry.WEIGHT_BACKENDS.get(name)  # unknown names raise here, before anything is loaded
    token = _IMPOSED.set(name)
    try:
        yield registry.WEIGHT_BACKENDS.get(name)
    finally:
        _IMPOSED.reset(token)


def backend_of(module) -> WeightBackend | None:
    """The backend that made a MixDQ module (``None`` for any other module)."""
    name = getattr(module, "mixdq_backend", None)
    return registry.WEIGHT_BACKENDS.get(name) if name else None


__all__ = ["WeightBackend", "backend_for", "backend_named", "backend_of", "default_backend", "use_weight_backend"]
