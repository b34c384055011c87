"""optimum-quanto as a weight backend (the only package of diffusers-mixdq that imports optimum-quanto)."""

from __future__ import annotations

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
