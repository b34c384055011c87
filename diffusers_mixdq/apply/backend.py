"""The optimum-quanto seam: the only module of diffusers-mixdq that imports optimum-quanto.

Everything the rest of the package needs from a quantization library goes through the functions below
(``make_module``, ``quantize_weight_``, ``load_quantized_weight``, ``describe``), so replacing optimum-quanto
(in maintenance mode upstream) means rewriting this file only.

Design:

* Weights are stored as quanto tensors (``WeightQBytesTensor`` for int8/float8, ``WeightQBitsTensor`` for
  int4/int2), so serialization, packing and quanto's optimized GPU kernels come for free.
* Activations are quantized by our own modules, not by quanto's hooks: quanto's ``QConv2d`` never quantizes its
  input, and quanto's int8 x int8 CPU path (``torch._int_mm``) is ~75x slower than fp32 on CPUs without VNNI.
  We quantize the input in the model's float dtype (round-to-nearest, clamp, rescale: numerically the same
  values an int8 kernel sees) and run the weight-only path. Static scales live in quanto's ``input_scale``
  buffer, so they are saved with the weights.
* quanto's C++ extension (int4/int2 unpacking on CPU) is built into a user cache directory, never into
  site-packages.
* quanto's int4/int2 linear fails under ``torch.inference_mode()`` (upstream issue #304); our modules step out of
  inference mode (keeping ``no_grad``) for that call, so users never see it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..plan.format import LayerSpec


def cache_dir() -> Path:
    """Where compiled artefacts go: ``$DIFFUSERS_MIXDQ_CACHE``, else ``$XDG_CACHE_HOME/diffusers_mixdq``,
    else ``~/.cache/diffusers_mixdq``."""
    env = os.environ.get("DIFFUSERS_MIXDQ_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffusers_mixdq"


def _redirect_extension_build() -> None:
    from optimum.quanto.library.extensions import cpp

    build = cache_dir() / "quanto-ext" / f"torch-{torch.__version__}"
    cpp.ext.build_directory = str(build)


_redirect_extension_build()

from optimum.quanto import QConv2d, QLinear, QTensor, qfloat8, qint2, qint4, qint8  # noqa: E402
from optimum.quanto.tensor.weights import WeightQBitsTensor  # noqa: E402

_WEIGHT_QTYPES = {"int8": qint8, "int4": qint4, "int2": qint2, "float8": qfloat8}
_QTYPE_NAMES = {q.name: name for name, q in _WEIGHT_QTYPES.items()}
_FLOAT8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
_ACT_QMAX = {"int8": 127.0, "float8": _FLOAT8_MAX}


def activation_scale(dtype: str, absmax: float) -> float:
    """The per-tensor scale that maps ``absmax`` to the largest code of activation ``dtype``."""
    return max(float(absmax), 1e-12) / _ACT_QMAX[dtype]


def fake_quantize_activation(x: torch.Tensor, dtype: str, scale: torch.Tensor | None) -> torch.Tensor:
    """Quantize ``x`` per tensor to ``dtype`` and back (``scale=None``: dynamic, from ``x``'s absmax)."""
    if scale is None:
        scale = x.detach().abs().amax().float().clamp_min(1e-12) / _ACT_QMAX[dtype]
    scale = scale.to(x.dtype)
    if dtype == "int8":
        return torch.clamp(torch.round(x / scale), -128, 127) * scale
    if dtype == "float8":
        q = torch.clamp(x / scale, -_FLOAT8_MAX, _FLOAT8_MAX).to(torch.float8_e4m3fn)
        return q.to(x.dtype) * scale
    raise ValueError(f"unknown activation dtype {dtype!r}")


class _ActivationMixin:
    """Input quantization + weight-quantized forward shared by MixDQLinear and MixDQConv2d."""

    act_dtype: str = "none"
    act_dynamic: bool = False
    #: set when tensors computed from the full-precision model replace some output rows (BOS-aware layers)
    mixdq_flags: dict

    def _configure(self, spec: LayerSpec, scale_dtype: torch.dtype) -> None:
        self.act_dtype = spec.activations
        self.act_dynamic = spec.dynamic
        self.mixdq_flags = dict(spec.flags)
        scale = 1.0
        if spec.activations != "none" and not spec.dynamic:
            scale = activation_scale(spec.activations, float(spec.act_range))
        # small buffers are created for real (not on meta) so they exist even when the checkpoint lacks them
        self.input_scale = torch.tensor(scale, dtype=scale_dtype)
        self.output_scale = torch.ones((), dtype=scale_dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 (overrides quanto's hook)
        if self.act_dtype == "none":
            return x
        return fake_quantize_activation(x, self.act_dtype, None if self.act_dynamic else self.input_scale)

    def _weight(self):
        return self.weight if self.weight_qtype is None else self.qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_inference_mode_enabled() and isinstance(self.weight, WeightQBitsTensor):
            with torch.inference_mode(False), torch.no_grad():
                return self._qforward(self.quantize_input(x))
        return self._qforward(self.quantize_input(x))


class MixDQLinear(_ActivationMixin, QLinear):
    """A quanto ``QLinear`` whose input is quantized per the plan (static or dynamic per-tensor)."""

    def _qforward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight(), self.bias)


class MixDQConv2d(_ActivationMixin, QConv2d):
    """A quanto ``QConv2d`` whose input is quantized per the plan (quanto's own never quantizes its input)."""

    def _qforward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self._weight(), self.bias)


QUANTIZED_MODULE_TYPES = (MixDQLinear, MixDQConv2d)


def is_quantized_module(module: nn.Module) -> bool:
    return isinstance(module, QUANTIZED_MODULE_TYPES)


def make_module(module: nn.Module, spec: LayerSpec, scale_dtype: torch.dtype) -> nn.Module:
    """A MixDQ module shaped like ``module`` (weights left on the meta device, not yet quantized).

    ``module`` must be a Linear or Conv2d and not already quantized (re-quantizing a quantized module would
    compound the error; callers check, this asserts).
    """
    if isinstance(module, (QLinear, QConv2d)):
        raise TypeError(f"{type(module).__name__} is already quantized")
    qtype = _WEIGHT_QTYPES.get(spec.weights)
    cls = MixDQLinear if isinstance(module, nn.Linear) else MixDQConv2d
    qmodule = cls.qcreate(module, weights=qtype, activations=None, optimizer=None, device="meta")
    qmodule._configure(spec, scale_dtype)
    qmodule.requires_grad_(False)
    return qmodule


def freeze_meta(module: nn.Module) -> None:
    """Turn a meta module's float weight into an (empty) quantized one so its state-dict keys are those of a
    saved quantized checkpoint (``weight._data``, ``weight._scale``, ...)."""
    if module.weight_qtype is not None:
        module.freeze()


def quantize_weight_(module: nn.Module) -> None:
    """Quantize the module's (just loaded, full-precision) weight in place."""
    if module.weight_qtype is not None and not module.frozen:
        module.freeze()
    module.weight.requires_grad_(False)


def quantized_weight_keys(module: nn.Module) -> set[str]:
    """State-dict keys (relative to the module) of a frozen module's quantized weight."""
    return {k for k in module.state_dict(keep_vars=True) if k.startswith("weight.")}


def load_quantized_weight(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Install a saved quantized weight (keys ``weight._data``, ``weight._scale``, ...) with quanto's own
    deserialisation (which also picks the fastest kernel layout for the device)."""
    result = module.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise KeyError(f"unexpected keys {result.unexpected_keys}")
    module.weight.requires_grad_(False)


def describe(module: nn.Module) -> tuple[str, str]:
    """(weight dtype, activation dtype) of a module, in plan vocabulary; ``("none", "none")`` if not quantized."""
    if not is_quantized_module(module):
        return "none", "none"
    w = "none" if module.weight_qtype is None else _QTYPE_NAMES[module.weight_qtype.name]
    if isinstance(module.weight, QTensor) and module.weight_qtype is not None:
        w = _QTYPE_NAMES[module.weight.qtype.name]
    return w, module.act_dtype


def has_meta_tensors(module: nn.Module) -> bool:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.device.type == "meta":
            return True
        if isinstance(t, QTensor):
            inner = getattr(t, "_data", None)
            if inner is not None and inner.device.type == "meta":
                return True
    return False
