"""Apply: *how* a plan becomes quantized modules (the weight backend lives behind ``backend``).

Names are exported lazily so that ``import diffusers_mixdq`` does not import the quantization library.
"""

from __future__ import annotations

from importlib import import_module

from . import backends as _backends  # noqa: F401  (registers the weight backends)

_EXPORTS = {
    "quantized_layers": ".readback",
    "quantize_module": ".backend",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
