"""Run a function right after a module has been imported, without importing it ourselves.

``import diffusers_mixdq`` must register the ``mixdq`` quantization method with diffusers, but importing diffusers
(and torch with it) takes seconds, which ``mixdq --help`` and every light use of the package would pay. So the
registration runs when diffusers' quantizer tables are imported by anyone (at once when they already are): a
finder on ``sys.meta_path`` wraps the loader of the watched modules and calls the hooks after the module has run.
Every lookup diffusers makes in those tables happens after that import, so nothing can observe them unregistered.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from typing import Callable

_HOOKS: dict[str, list[Callable[[object], None]]] = {}
_LOCK = threading.Lock()


def when_imported(name: str, hook: Callable[[object], None]) -> None:
    """Call ``hook(module)`` once module ``name`` is imported: now if it already is, else right after its import.

    A hook already waiting for ``name`` (same function) is not added twice, so re-importing the caller is harmless.
    """
    with _LOCK:
        module = sys.modules.get(name)
        if module is None:
            hooks = _HOOKS.setdefault(name, [])
            if any(_same(h, hook) for h in hooks):
                return
            hooks.append(hook)
            if not any(isinstance(f, _HookFinder) for f in sys.meta_path):
                sys.meta_path.insert(0, _HookFinder())
            return
    hook(module)


def _same(a: Callable, b: Callable) -> bool:
    return getattr(a, "__qualname__", a) == getattr(b, "__qualname__", b) and getattr(a, "__module__", None) == getattr(
        b, "__module__", None
    )


def is_initializing(name: str) -> bool:
    """Whether module ``name`` is being imported right now (in ``sys.modules``, its code still running)."""
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def _run_hooks(name: str, module) -> None:
    with _LOCK:
        hooks = _HOOKS.pop(name, [])
    for hook in hooks:
        hook(module)


class _HookLoader(importlib.abc.Loader):
    """Delegates to the real loader; after ``exec_module`` runs the hooks waiting for the module."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _run_hooks(module.__name__, module)

    def __getattr__(self, name):  # get_resource_reader, get_source, is_package, ... of the real loader
        return getattr(self._loader, name)


class _HookFinder(importlib.abc.MetaPathFinder):
    """Finds watched modules with the other finders and hands out their spec with a :class:`_HookLoader`."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HookLoader(spec.loader)
                return spec
        return None
