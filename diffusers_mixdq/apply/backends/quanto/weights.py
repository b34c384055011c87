"""optimum-quanto's quantized weights: quantizing, their saved keys, loading them back, reading their dtype."""

from __future__ import annotations

import torch
from optimum.quanto import QLinear, QTensor
from optimum.quanto.tensor.weights import WeightQBitsTensor, WeightQBytesTensor
from torch import nn

from .. import layout
from .modules import QTYPE_NAMES

_KEYS_CACHE: dict[str, frozenset[str]] = {}


def quantize_weight_(module: nn.Module) -> None:
    """Quantize the module's (just loaded, full-precision) weight in place (quanto's ``freeze``)."""
    if module.weight_qtype is not None and not module.frozen:
        module.freeze()
    module.weight.requires_grad_(False)


def quantized_weight_keys(module: nn.Module) -> frozenset[str]:
    """State-dict keys (relative to the module) of a quantized weight of this module's qtype (``weight._data``,
    ``weight._scale``, ...), read off a tiny frozen quanto module of the same qtype."""
    name = module.weight_qtype.name
    if name not in _KEYS_CACHE:
        probe = QLinear(128, 2, bias=False, weights=module.weight_qtype)
        probe.freeze()
        _KEYS_CACHE[name] = frozenset(k for k in probe.state_dict() if k.startswith("weight."))
    return _KEYS_CACHE[name]


def _deserialize(module: nn.Module, tensors: dict[str, torch.Tensor], missing: list[str]):
    """quanto's own deserialisation of a weight (the classmethod its ``QModuleMixin._load_from_state_dict``
    calls). That method itself is not used: it always runs ``optimize()`` and moves the weight to the module's
    (meta) device."""
    common = dict(qtype=module.weight_qtype, axis=0, size=module.weight.size(), stride=module.weight.stride(),
                  missing_keys=missing)
    if module.weight_qtype.bits == 8:
        return WeightQBytesTensor.load_from_state_dict(tensors, "weight.", activation_qtype=None, **common)
    return WeightQBitsTensor.load_from_state_dict(tensors, "weight.", group_size=module.weight_group_size,
                                                  **common)


def load_quantized_weight(module: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Install a saved quantized weight (``tensors`` keyed ``weight._data``, ``weight._scale``, ...).

    Every tensor is copied into memory of its own (see the comment below). The kernel-specific re-layout (``optimize``) runs on accelerators only: on the CPU it unpacks and re-packs
    int4 / int2 weights into the same layout, which costs time and memory for nothing.
    """
    # own, aligned memory: a tensor memory-mapped from a safetensors file may start at any byte offset, and
    # torch's CPU int8 kernels (``_weight_int8pack_mm``, used for bf16 inputs) crash on unaligned data
    tensors = {k: v.to(device, copy=True, memory_format=torch.contiguous_format) for k, v in tensors.items()}
    missing: list[str] = []
    weight = _deserialize(module, tensors, missing)
    if weight is None or tensors:
        raise KeyError(f"missing {missing}, unexpected {sorted(tensors)}")
    if torch.device(device).type != "cpu":
        weight = weight.optimize()
    module.weight = nn.Parameter(weight, requires_grad=False)


def weight_dtype(module: nn.Module) -> str:
    """The stored weight dtype of a MixDQ module in plan vocabulary."""
    if module.weight_qtype is None:
        return "none"
    qtype = module.weight.qtype if isinstance(module.weight, QTensor) else module.weight_qtype
    return QTYPE_NAMES[qtype.name]


def has_meta_tensors(module: nn.Module) -> bool:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.device.type == "meta":
            return True
        inner = getattr(t, "_data", None) if isinstance(t, QTensor) else None
        if inner is not None and inner.device.type == "meta":
            return True
    return False


def expected_pieces(module: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """``{key: (shape, dtype)}`` of the saved quantized weight of ``module`` (its qtype and weight shape), dtype
    ``None`` for scales and shifts, which are stored in the model's float dtype (:mod:`..layout`)."""
    qtype = module.weight_qtype
    return layout.torch_pieces(qtype.bits, qtype.is_floating_point, tuple(module.weight.shape))
