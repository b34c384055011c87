"""optimum-quanto as a weight backend: the only package of diffusers-mixdq that imports optimum-quanto.

``modules`` holds the quantized Linear / Conv2d classes (and redirects quanto's C++ extension build), ``weights``
quantizing, saving and loading their weights. This file imports neither at import time: ``import diffusers_mixdq``
must not import optimum-quanto, and plan summaries ask :meth:`QuantoBackend.storage_bits` for sizes.
"""

from __future__ import annotations

from importlib import import_module

from ....registry import WEIGHT_BACKENDS
from ..base import WeightBackend


def group_size(in_features: int) -> int:
    """optimum-quanto's group size for int4 / int2 weights: 128, lowered by 32 until it divides ``in_features``
    (down to 32), else the whole row; rows of 128 elements or fewer are one group."""
    if in_features <= 128:
        return in_features
    for size in (128, 96, 64, 32):
        if in_features % size == 0:
            return size
    return in_features


def _modules():
    return import_module(".modules", __name__)


def _weights():
    return import_module(".weights", __name__)


class QuantoBackend(WeightBackend):
    name = "quanto"

    def storage_bits(self, dtype: str, bits: int | None, in_features: int, float_bits: int = 16) -> float:
        """int8 / float8: one ``float_bits`` scale per output channel; int4 / int2: a scale and a shift per group."""
        if bits is None:
            return float(float_bits)
        k = max(in_features, 1)
        if bits == 8:
            return bits + float_bits / k
        return bits + 2 * float_bits / group_size(k)

    def prepare(self) -> None:
        _modules()  # redirects the extension build into the user cache on first import

    def make_module(self, module, spec, scale_dtype):
        return _modules().make_module(module, spec, scale_dtype, self.name)

    def quantize_weight_(self, module) -> None:
        _weights().quantize_weight_(module)

    def quantized_weight_keys(self, module) -> frozenset[str]:
        return _weights().quantized_weight_keys(module)

    def weight_key_of(self, key: str) -> str | None:
        """quanto saves a quantized weight as its inner tensors: ``<module>.weight._data``, ``._scale``, ..."""
        i = key.rfind(".weight.")
        return key[: i + len(".weight")] if i >= 0 else None

    def expected_pieces(self, module):
        return _weights().expected_pieces(module)

    def load_quantized_weight(self, module, tensors, device) -> None:
        _weights().load_quantized_weight(module, tensors, device)

    def weight_dtype(self, module) -> str:
        return _weights().weight_dtype(module)

    def has_meta_tensors(self, module) -> bool:
        return _weights().has_meta_tensors(module)


WEIGHT_BACKENDS.register("quanto", QuantoBackend())
