"""The native weight backend: quanto's stored layout, PyTorch's own kernels, no optimum-quanto at all.

Pick it with ``MixDQConfig(plan=..., weight_backend="native")`` (or, for a saved model, ``with
diffusers_mixdq.use_weight_backend("native"): ...from_pretrained(path)``). It stores every quantized weight in
the layout of the quanto backend (:mod:`..layout`: same numerics, same state-dict keys), so plans and checkpoints
made with either backend load into the other, and it needs nothing but torch to quantize, load and run. How each
call runs (packed kernels, dequantize a slice at a time, opt-in caches) is in :mod:`.kernels` and
:mod:`.cache`. Nothing here is imported by ``import diffusers_mixdq`` until a model uses the backend.
"""

from __future__ import annotations

from importlib import import_module

from ....registry import WEIGHT_BACKENDS
from ..base import WeightBackend
from ..layout import SharedLayout, piece_keys, torch_pieces


def _modules():
    return import_module(".modules", __name__)


class NativeBackend(SharedLayout, WeightBackend):
    name = "native"
    outlier_rows_apart = True

    def make_module(self, module, spec, scale_dtype):
        return _modules().make_module(module, spec, scale_dtype, self.name)

    def quantize_weight_(self, module) -> None:
        _modules().quantize_weight_(module)

    def quantized_weight_keys(self, module) -> frozenset[str]:
        return piece_keys(module.qbits)

    def expected_pieces(self, module):
        return torch_pieces(module.qbits, module.qfloat8, tuple(module.weight_shape))

    def load_quantized_weight(self, module, tensors, device) -> None:
        _modules().install_pieces(module, tensors, device)

    def weight_dtype(self, module) -> str:
        return module.mixdq_spec.weights if module.qbits else "none"


WEIGHT_BACKENDS.register("native", NativeBackend())
