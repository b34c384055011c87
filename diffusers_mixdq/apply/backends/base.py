"""The weight-backend interface: everything ``apply`` needs from a library that stores quantized weights.

Adding a backend is one new module (or package) under ``apply/backends/`` that subclasses :class:`WeightBackend`
and registers an instance: ``WEIGHT_BACKENDS.register("name", MyBackend())`` (see ``backends/quanto`` for the
optimum-quanto one). Its Linear / Conv2d classes mix in :class:`~diffusers_mixdq.apply.qmodule.MixDQModuleMixin`
(input quantization and BOS rows come with it) and provide ``_qforward`` and ``weight_is_quantized``. Nothing else
changes: the diffusers quantizer, ``quantize_module`` and ``quantized_layers`` only call the methods below.

Rules: ``storage_bits`` must not import the backend's library (plan summaries call it to estimate sizes); the
other methods may, but lazily, so that ``import diffusers_mixdq`` never imports a quantization library.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ...plan import LayerSpec


def module_available(name: str) -> bool:
    """Whether module ``name`` can be found (its parent packages are imported for a dotted name)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package, or a module set to None in sys.modules
        return False


class WeightBackend(ABC):
    """How quantized weights are laid out in memory and on disk, made, loaded and described."""

    name: str = ""
    #: the packages the backend imports: ``(distribution name for pip, module to find)`` pairs
    requirements: tuple[tuple[str, str], ...] = ()

    @property
    def required_packages(self) -> list[str]:
        """The distributions the backend needs (what a quantizer declares to its library)."""
        return [dist for dist, _ in self.requirements]

    def missing_packages(self) -> list[str]:
        """The required distributions this Python cannot import (looked up the way diffusers and transformers
        check theirs, ``importlib.util.find_spec``; nothing is imported)."""
        return [dist for dist, module in self.requirements if not module_available(module)]

    #: the plan weight dtypes this backend stores (``None``: every one of ``plan.WEIGHT_DTYPES``)
    weight_dtypes: tuple[str, ...] | None = None
    #: whether a layer with outlier channels stores its other rows only (plan sizes count each row once)
    outlier_rows_apart: bool = False

    def lacks(self, spec: LayerSpec) -> str | None:
        """What of ``spec`` this backend cannot store (``None``: nothing)."""
        if self.weight_dtypes is not None and spec.weights not in self.weight_dtypes:
            return f"{spec.weights} weights"
        return "outlier channels" if spec.outliers and not self.outlier_rows_apart else None

    @abstractmethod
    def storage_bits(self, dtype: str, bits: int | None, in_features: int, float_bits: int = 16) -> float:
        """Stored bits per weight element of a layer whose rows reduce ``in_features`` elements, metadata
        (scales, shifts) included; ``bits=None`` means kept in floating point."""

    def prepare(self) -> None:
        """One-time setup before the first module is made (extension build directories, caches)."""

    @abstractmethod
    def make_module(self, module: nn.Module, spec: LayerSpec, scale_dtype: torch.dtype) -> nn.Module:
        """A MixDQ module shaped like the Linear / Conv2d ``module``, weights on the meta device, not yet
        quantized. Raises ``TypeError`` when ``module`` is already quantized by the library."""

    @abstractmethod
    def quantize_weight_(self, module: nn.Module) -> None:
        """Quantize the module's just-loaded full-precision weight in place (no-op for float weights)."""

    @abstractmethod
    def quantized_weight_keys(self, module: nn.Module) -> frozenset[str]:
        """State-dict keys, relative to the module, under which its quantized weight is saved."""

    @abstractmethod
    def weight_key_of(self, key: str) -> str | None:
        """For a checkpoint key that is a piece of a saved quantized weight (``"a.b.weight._data"`` for quanto),
        the weight's own key (``"a.b.weight"``); ``None`` for any other key."""

    def expected_pieces(self, module: nn.Module) -> dict[str, tuple]:
        """``{key: (shape, dtype)}`` of the saved quantized weight of ``module`` (``dtype`` ``None``: the model's
        float dtype), to check a checkpoint before loading it. Empty: the backend does not say (no check)."""
        return {}

    @abstractmethod
    def load_quantized_weight(self, module: nn.Module, tensors: dict[str, torch.Tensor], device) -> None:
        """Install a saved quantized weight (``tensors`` keyed as :meth:`quantized_weight_keys`). Raises
        ``KeyError`` / ``RuntimeError`` / ``ValueError`` when the tensors do not fit the module."""

    @abstractmethod
    def weight_dtype(self, module: nn.Module) -> str:
        """The module's stored weight dtype in plan vocabulary (``"int8"``, ..., ``"none"``)."""

    def has_meta_tensors(self, module: nn.Module) -> bool:
        """Whether any of the module's own tensors (quantized weights' inner tensors included) is on meta."""
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        return any(t.device.type == "meta" for t in own)
