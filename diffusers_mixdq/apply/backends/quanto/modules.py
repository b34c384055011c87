"""optimum-quanto's Linear / Conv2d with MixDQ's input quantization and BOS rows mixed in.

Design:

* Weights are stored as quanto tensors (``WeightQBytesTensor`` for int8/float8, ``WeightQBitsTensor`` for
  int4/int2), so serialization, packing and quanto's optimized GPU kernels come for free.
* Activations are quantized by our own modules (:mod:`diffusers_mixdq.apply.activations`), not by quanto's hooks:
  quanto's ``QConv2d`` never quantizes its input, and quanto's int8 x int8 CPU path (``torch._int_mm``) is ~75x
  slower than fp32 on CPUs without VNNI. Static scales live in quanto's ``input_scale`` buffer, so they are saved
  with the weights.
* quanto's C++ extension (int4/int2 unpacking on CPU) is built into a user cache directory, never into
  site-packages (:func:`redirect_extension_build`, run before optimum.quanto's modules are imported); a build
  interrupted half-way never blocks later ones (:mod:`.build_lock`).
* quanto's int4/int2 linear fails under ``torch.inference_mode()`` (upstream issue #304); our modules step out of
  inference mode (keeping ``no_grad``) for that call, so users never see it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def cache_dir() -> Path:
    """Where compiled artefacts go: ``$DIFFUSERS_MIXDQ_CACHE``, else ``$XDG_CACHE_HOME/diffusers_mixdq``,
    else ``~/.cache/diffusers_mixdq``."""
    env = os.environ.get("DIFFUSERS_MIXDQ_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffusers_mixdq"


def redirect_extension_build() -> None:
    """Point quanto's C++ extension build at :func:`cache_dir` (site-packages may be read-only), and make it
    survive interruption (:mod:`.build_lock`: stale locks cleared, never an endless wait)."""
    from optimum.quanto.library.extensions import cpp

    from .build_lock import guard_extension

    cpp.ext.build_directory = str(cache_dir() / "quanto-ext" / f"torch-{torch.__version__}")
    guard_extension(cpp.ext)


redirect_extension_build()

from optimum.quanto import QConv2d, QLinear, QTensor, qfloat8, qint2, qint4, qint8  # noqa: E402
from optimum.quanto.tensor.weights import WeightQBitsTensor  # noqa: E402

from ...qmodule import MixDQModuleMixin  # noqa: E402

WEIGHT_QTYPES = {"int8": qint8, "int4": qint4, "int2": qint2, "float8": qfloat8}
QTYPE_NAMES = {q.name: name for name, q in WEIGHT_QTYPES.items()}


class _QuantoWeight:
    """The quanto side of a MixDQ module: which weight the op uses, and quanto's inference-mode limitation."""

    def weight_is_quantized(self) -> bool:
        return isinstance(self.weight, QTensor)

    def _needs_grad_mode(self) -> bool:
        return isinstance(self.weight, WeightQBitsTensor)

    def _weight(self):
        return self.weight if self.weight_qtype is None else self.qweight


class MixDQLinear(_QuantoWeight, MixDQModuleMixin, QLinear):
    """A quanto ``QLinear`` whose input is quantized per the plan (static or dynamic per-tensor)."""

    def _qforward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight(), self.bias)


class MixDQConv2d(_QuantoWeight, MixDQModuleMixin, QConv2d):
    """A quanto ``QConv2d`` whose input is quantized per the plan (quanto's own never quantizes its input)."""

    def _qforward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self._weight(), self.bias)


def make_module(module: nn.Module, spec, scale_dtype: torch.dtype, backend: str) -> nn.Module:
    """A MixDQ module shaped like ``module`` (weights left on the meta device, not yet quantized)."""
    if isinstance(module, (QLinear, QConv2d)):
        raise TypeError(f"{type(module).__name__} is already quantized")
    qtype = WEIGHT_QTYPES.get(spec.weights)
    cls = MixDQLinear if isinstance(module, nn.Linear) else MixDQConv2d
    qmodule = cls.qcreate(module, weights=qtype, activations=None, optimizer=None, device="meta")
    qmodule._configure(spec, scale_dtype, backend)
    qmodule.requires_grad_(False)
    return qmodule
