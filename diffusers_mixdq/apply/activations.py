"""Activation schemes: how a quantized layer's input is quantized (backend-independent, torch only).

A scheme is an :class:`ActivationScheme` registered in :data:`ACTIVATION_SCHEMES`; the MixDQ modules of every weight
backend call the scheme picked for their :class:`~diffusers_mixdq.LayerSpec` by :func:`scheme_for`:

* ``"static"``: per-tensor, the scale fixed from the plan's ``act_range`` (kept in the module's ``input_scale``
  buffer, so it is saved with the weights);
* ``"dynamic"``: per-tensor, the scale taken from each input's absolute maximum (``act_range: "dynamic"``);
* ``"dynamic-token"``: one run-time scale per token (ViDiT-Q): the absolute maximum over the features of each row
  of a Linear input, over the channels of each spatial position of a Conv2d input (``act_range: "dynamic-token"``).

A static layer with timestep groups (``act_groups``) keeps the static scheme; its module passes the scale of the
current group (:mod:`diffusers_mixdq.apply.timestep_groups`).

Both quantize in the model's float dtype (round to the grid, clamp, rescale: the values an int8 / int4 / float8
kernel would see). To add a scheme (e.g. per-token), subclass :class:`ActivationScheme`, register it with
``ACTIVATION_SCHEMES.register("name", MyScheme())`` and make :func:`scheme_for` (or a plan flag) pick it; give it
a :meth:`ActivationScheme.scale` too and real low-precision GEMMs (the native backend's on CUDA) take its layers,
quantizing to the same codes (:func:`quantize_codes`).
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


def quantize_codes(x: torch.Tensor, dtype: str, scale: torch.Tensor) -> torch.Tensor:
    """The codes of ``x`` quantized per ``scale`` (already in ``x``'s dtype) to ``dtype``: integer codes held in
    ``x``'s dtype (rounded, clamped), float8 values as float8. The simulated path rescales them
    (:func:`fake_quantize`); a real low-precision GEMM takes them as they are."""
    if dtype in ("int8", "int4"):
        qmax = ACT_QMAX[dtype]
        return (x / scale).round_().clamp_(-qmax - 1, qmax)
    if dtype == "float8":
        return torch.clamp(x / scale, -_FLOAT8_MAX, _FLOAT8_MAX).to(_FLOAT8)
    raise ValueError(f"unknown activation dtype {dtype!r}")


def fake_quantize(x: torch.Tensor, dtype: str, scale: torch.Tensor) -> torch.Tensor:
    """``x`` quantized per tensor to ``dtype`` with ``scale`` and back, in ``x``'s dtype: one new tensor, the
    rounding, clamping and rescaling done in place on it (torch.compile fuses the four into one loop)."""
    scale = scale.to(x.dtype)
    codes = quantize_codes(x, dtype, scale)
    return codes.mul_(scale) if codes.dtype == x.dtype else codes.to(x.dtype).mul_(scale)


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

    def bind(self, module) -> "ActivationScheme":
        """The scheme as used by ``module`` (a Linear / Conv2d MixDQ module); the same object by default."""
        return self

    def scale(self, x: torch.Tensor, dtype: str, input_scale: torch.Tensor) -> torch.Tensor | None:
        """The scale :meth:`quantize` uses for ``x`` (0-dim per tensor, a kept dim per token), for the real
        low-precision GEMMs; ``None`` (the default): the scheme has none of its own (its layers are simulated)."""
        return None

    @abstractmethod
    def quantize(self, x: torch.Tensor, dtype: str, input_scale: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized to activation ``dtype``."""


class StaticPerTensor(ActivationScheme):
    """One scale per tensor, fixed from the plan's calibrated absolute-max range."""

    name = "static"

    def initial_scale(self, spec: LayerSpec) -> float:
        return activation_scale(spec.activations, float(spec.act_range))

    def scale(self, x: torch.Tensor, dtype: str, input_scale: torch.Tensor) -> torch.Tensor:
        return input_scale

    def quantize(self, x: torch.Tensor, dtype: str, input_scale: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, dtype, self.scale(x, dtype, input_scale))


class DynamicPerTensor(ActivationScheme):
    """One scale per tensor, from the input's own absolute maximum at run time."""

    name = "dynamic"

    def scale(self, x: torch.Tensor, dtype: str, input_scale: torch.Tensor) -> torch.Tensor:
        return absmax(x).float().clamp_min(1e-12) / ACT_QMAX[dtype]

    def quantize(self, x: torch.Tensor, dtype: str, input_scale: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, dtype, self.scale(x, dtype, input_scale))


class DynamicPerToken(ActivationScheme):
    """One scale per token from its own absolute maximum at run time: reduced over the features (last dim) of a
    Linear input, over the channels (dim 1) of a Conv2d input, so an outlier token widens only its own range."""

    name = "dynamic-token"

    def __init__(self, channel_dim: int = -1):
        self.channel_dim = channel_dim

    def bind(self, module) -> ActivationScheme:
        return DynamicPerToken(1 if isinstance(module, torch.nn.Conv2d) else -1)

    def scale(self, x: torch.Tensor, dtype: str, input_scale: torch.Tensor) -> torch.Tensor:
        dim = self.channel_dim if x.dim() > 1 else -1
        return x.detach().abs().amax(dim=dim, keepdim=True).float().clamp_min(1e-12) / ACT_QMAX[dtype]

    def quantize(self, x: torch.Tensor, dtype: str, input_scale: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, dtype, self.scale(x, dtype, input_scale))


ACTIVATION_SCHEMES: Registry[ActivationScheme] = Registry("activation scheme")
ACTIVATION_SCHEMES.register("static", StaticPerTensor())
ACTIVATION_SCHEMES.register("dynamic", DynamicPerTensor())
ACTIVATION_SCHEMES.register("dynamic-token", DynamicPerToken())


def scheme_for(spec: LayerSpec) -> ActivationScheme | None:
    """The scheme of a layer: ``None`` when its input is not quantized, the scheme named by a run-time
    ``act_range`` (``"dynamic"``, ``"dynamic-token"``), else ``"static"`` (a number)."""
    if spec.activations == "none":
        return None
    return ACTIVATION_SCHEMES.get(spec.act_range if spec.dynamic else "static")
