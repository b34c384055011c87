"""The weight-backend interface."""

from __future__ import annotations

from abc import ABC, abstractmethod


class WeightBackend(ABC):
    """How quantized weights are laid out in memory and on disk.

    ``storage_bits`` must not import the backend's quantization library: plan summaries call it to estimate sizes.
    """

    name: str = ""

    @abstractmethod
    def storage_bits(self, dtype: str, bits: int | None, in_features: int, float_bits: int = 16) -> float:
        """Stored bits per weight element of a layer whose rows reduce ``in_features`` elements, metadata
        (scales, shifts) included; ``bits=None`` means kept in floating point."""
