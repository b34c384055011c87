"""Activation schemes: how a quantized layer's input is quantized (backend-independent, torch only).

A scheme is an :class:`ActivationScheme` registered in :data:`ACTIVATION_SCHEMES`; the MixDQ modules of every weight
backend call the scheme picked for their :class:`~diffusers_mixdq.LayerSpec` by :func:`scheme_for`:

* ``"static"``: per-tensor, the scale fixed from the plan's ``act_range`` (kept in the module's ``input_scale``
  buffer, so it is saved with the weights);
* ``"dynamic"``: per-tensor, the scale taken from each input's absolute maximum (``act_range: "dynamic"``).

Both quantize in the model's float dtype (round to the grid, clamp, rescale: the values an int8 / int4 / float8
kernel would see). To add a scheme (e.g. per-token), subclass :class:`ActivationScheme`, register it with
``ACTIVATION_SCHEMES.register("name", MyScheme())`` and make :func:`scheme_for` (or a plan flag) pick it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..plan import LayerSpec
from ..registry import Registry

_FLOAT8 = torch.float8_e4m3fn
_FLOAT8_MAX = float(torch.finfo(_FLOAT8).max)
#: largest code of each activation dtype
ACT_QMAX = {"int8": 127.0, "int4": 7.0, "float8": _FLOAT8_MAX}


def activation_scale(dtype: str, absmax: float) -> float:
    """The per-tensor scale that maps ``absmax`` to the largest code of activation ``dtype``."""
    return max(float(absmax), 1e-12) / ACT_QMAX[dtype]


def fake_quantize(x: torch.Tensor, dtype: str, scale: torch.Tensor) -> torch.Tensor:
    """``x`` quantized per tensor to ``dtype`` with ``scale`` and back, in ``x``'s dtype: one new tensor, the
    rounding, clamping and rescaling done in place on it (torch.compile fuses the four into one loop)."""
    scale = scale.to(x.dtype)
    if dtype in ("int8", "int4"):
        qmax = ACT_QMAX[dtype]
        q = x / scale
        return q.round_().clamp_(-qmax - 1, qmax).mul_(scale)
    if dtype == "float8":
        q = torch.clamp(x / scale, -_FLOAT8_MAX, _FLOAT8_MAX).to(_FLOAT8)
        return q.to(x.dtype).mul_(scale)
    raise ValueError(f"unknown activation dtype {dtype!r}")


def absmax(x: torch.Tensor) -> torch.Tensor:
    """``x.abs().amax()`` in one pass over ``x`` without the ``abs`` copy."""
    low, high = torch.aminmax(x.detach())
    return torch.maximum(-low, high)


class ActivationScheme(ABC):
    """Quantizes a layer's input; ``initial_scale`` fills the module's ``input_scale`` buffer at creation."""

    name: str = ""

    def initial_scale(self, spec: LayerSpec) -> float:
        """The value of the module's ``input_scale`` buffer for a layer of ``spec`` (1.0: unused)."""
        return 1.0

    @abstractmethod
    def quantize(self, x: torch.Tensor, dtype: str, input_scale: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized to activation ``dtype``."""


class StaticPerTensor(ActivationScheme):
    """One scale per tensor, fixed from the plan's calibrated absolute-max range."""

    name = "static"

    def initial_scale(self, spec: LayerSpec) -> float:
        return activation_scale(spec.activations, float(spec.act_range))

    def quantize(self, x: torch.Tensor, dtype: str, input_scale: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, dtype, input_scale)


class DynamicPerTensor(ActivationScheme):
    """One scale per tensor, from the input's own absolute maximum at run time."""

    name = "dynamic"

    def quantize(self, x: torch.Tensor, dtype: str, input_scale: torch.Tensor) -> torch.Tensor:
        scale = absmax(x).float().clamp_min(1e-12) / ACT_QMAX[dtype]
        return fake_quantize(x, dtype, scale)


ACTIVATION_SCHEMES: Registry[ActivationScheme] = Registry("activation scheme")
ACTIVATION_SCHEMES.register("static", StaticPerTensor())
ACTIVATION_SCHEMES.register("dynamic", DynamicPerTensor())


def scheme_for(spec: LayerSpec) -> ActivationScheme | None:
    """The scheme of a layer: ``None`` when its input is not quantized, ``"dynamic"`` for ``act_range:
    "dynamic"``, else ``"static"`` (a number)."""
    if spec.activations == "none":
        return None
    return ACTIVATION_SCHEMES.get("dynamic" if spec.dynamic else "static")
