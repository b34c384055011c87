"""Opt-in extra memory for speed on a model quantized by the native backend (both default off).

* :func:`cache_dequantized`: keep each chosen layer's weight dequantized once, in the model's float dtype, beside
  its quantized form (no per-call dequantization). It costs the float weight's memory per layer (returned, in
  bytes): meant for 3x3 convolutions on a CPU with memory to spare; :func:`drop_dequantized` undoes it.
* :func:`prepare_int4_kernels`: re-pack int4 Linear weights for ``aten._weight_int4pack_mm_for_cpu`` (another
  half byte per weight element), used for calls of few rows in bf16 (:mod:`.kernels`).
"""

from __future__ import annotations

import torch
from torch import nn

from .packing import unpack
from .modules import NativeConv2d, NativeLinear, _NativeWeight

_KINDS = {"conv": NativeConv2d, "linear": NativeLinear}


def _native_modules(model: nn.Module, kinds) -> list[nn.Module]:
    unknown = set(kinds) - set(_KINDS)
    if unknown:
        from ....errors import MixDQError

        raise MixDQError(f"Unknown layer kind(s) {sorted(unknown)}; use {sorted(_KINDS)}.")
    classes = tuple(_KINDS[k] for k in kinds)
    return [m for m in model.modules() if isinstance(m, classes) and m.qdata is not None]


def cache_dequantized(model: nn.Module, kinds=("conv",), pointwise: bool = False) -> int:
    """Dequantize the weights of the model's native layers of ``kinds`` (``"conv"``, ``"linear"``) once and keep
    them (1x1 convolutions only when ``pointwise``). Returns the bytes added."""
    added = 0
    for m in _native_modules(model, kinds):
        if isinstance(m, NativeConv2d) and m.is_pointwise and not pointwise:
            continue
        m.dequantized_cache = m.weight.dequantize().contiguous()
        added += m.dequantized_cache.numel() * m.dequantized_cache.element_size()
    return added


def drop_dequantized(model: nn.Module) -> int:
    """Drop every dequantize-once cache of the model; returns the bytes freed."""
    freed = 0
    for m in model.modules():
        if isinstance(m, _NativeWeight) and m.dequantized_cache is not None:
            freed += m.dequantized_cache.numel() * m.dequantized_cache.element_size()
            m.dequantized_cache = None
    return freed


def _tinygemm_group(group: int) -> int | None:
    """The largest group size the int4 CPU kernel takes that divides the stored group (scales repeated)."""
    return next((g for g in (256, 128, 64, 32) if group % g == 0), None)


def prepare_int4_kernels(model: nn.Module) -> int:
    """Pack every int4 native Linear of the model for the int4 CPU kernel; returns the bytes added (layers whose
    shape the kernel does not take, e.g. output features not a multiple of 16, are left to dequantize + GEMM)."""
    added = 0
    for m in _native_modules(model, ("linear",)):
        if m.qbits != 4 or m.qdata.device.type != "cpu":
            continue
        n, k = m.weight_shape
        rows = m.qscale.shape[0]
        stored_group = (n * k) // rows
        group = _tinygemm_group(stored_group)
        if group is None or k % group:
            continue
        ints = unpack(m.qdata, 4, rows).reshape(n, k).to(torch.int32)
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(ints, 1)
        except RuntimeError:
            continue
        repeat = stored_group // group
        scale = m.qscale.reshape(n, -1).repeat_interleave(repeat, dim=1)
        shift = m.qshift.reshape(n, -1).repeat_interleave(repeat, dim=1)
        m.int4_packed, m.int4_group = packed, group
        m.int4_scale_zeros = torch.stack([scale.t(), (8 * scale - shift).t()], dim=-1).contiguous()
        added += packed.numel() + m.int4_scale_zeros.numel() * m.int4_scale_zeros.element_size()
    return added
