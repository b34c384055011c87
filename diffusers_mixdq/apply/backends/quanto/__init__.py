"""optimum-quanto as a weight backend: the only package of diffusers-mixdq that imports optimum-quanto.

``modules`` holds the quantized Linear / Conv2d classes (and redirects quanto's C++ extension build), ``weights``
quantizing, saving and loading their weights. This file imports neither at import time: ``import diffusers_mixdq``
must not import optimum-quanto, and plan summaries ask :meth:`QuantoBackend.storage_bits` for sizes.
"""

from __future__ import annotations

from importlib import import_module

from ....registry import WEIGHT_BACKENDS
from ..base import WeightBackend
from ..layout import SharedLayout, group_size  # noqa: F401  (group_size re-exported: it used to live here)


def _modules():
    return import_module(".modules", __name__)


def _weights():
    return import_module(".weights", __name__)


class QuantoBackend(SharedLayout, WeightBackend):
    name = "quanto"
    requirements = (("optimum-quanto", "optimum.quanto"),)
    weight_dtypes = ("int8", "int4", "int2", "float8", "none")

    def prepare(self) -> None:
        _modules()  # redirects the extension build into the user cache on first import

    def make_module(self, module, spec, scale_dtype):
        return _modules().make_module(module, spec, scale_dtype, self.name)

    def quantize_weight_(self, module) -> None:
        _weights().quantize_weight_(module)

    def quantized_weight_keys(self, module) -> frozenset[str]:
        return _weights().quantized_weight_keys(module)

    def expected_pieces(self, module):
        return _weights().expected_pieces(module)

    def load_quantized_weight(self, module, tensors, device) -> None:
        _weights().load_quantized_weight(module, tensors, device)

    def weight_dtype(self, module) -> str:
        return _weights().weight_dtype(module)

    def has_meta_tensors(self, module) -> bool:
        return _weights().has_meta_tensors(module)


WEIGHT_BACKENDS.register("quanto", QuantoBackend())
