"""Apply: *how* a plan becomes quantized modules.

* ``quantizer``: the diffusers quantizer (``quant_method="mixdq"``), applying a plan while a checkpoint streams in;
* ``convert``: the same for modules already in memory (``quantize_module``);
* ``backends``: the weight-backend seam (optimum-quanto behind it, in ``backends/quanto``);
* ``activations``: the activation-scheme registry; ``qmodule``: what every MixDQ module does (input quantization,
  BOS rows); ``checkpoint``: the plan file a saved model carries; ``memory``: keeping loads lean.

Names are exported lazily so that ``import diffusers_mixdq`` does not import the quantization library.
"""

from __future__ import annotations

from importlib import import_module

from . import backends as _backends  # noqa: F401  (registers the weight backends)

_EXPORTS = {
    "quantized_layers": ".readback",
    "quantize_module": ".convert",
    "describe": ".convert",
    "ACTIVATION_SCHEMES": ".activations",
    "ActivationScheme": ".activations",
    "WeightBackend": ".backends",
    "default_backend": ".backends",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
