"""Keeping quantize-on-load lean: release the checkpoint's pages and the allocator's free memory.

Two things otherwise keep memory that a quantized model no longer needs:

* safetensors maps the whole checkpoint file; any tensor still viewing that mapping (a bias, a norm weight, a
  layer kept in floating point) keeps the full-precision file mapped and its touched pages resident.
* glibc's allocator keeps the heap pages freed by the per-layer quantization temporaries instead of returning
  them to the system (fragmentation), so resident memory stays near its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

from torch import nn


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def release_free_memory() -> None:
    """Return the allocator's free heap pages to the system (glibc only; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def detach_from_checkpoint(model: nn.Module, skip: set[int]) -> None:
    """Give every parameter and buffer of ``model`` its own storage (except tensors whose ``id`` is in ``skip``),
    so no tensor keeps the memory-mapped full-precision checkpoint alive."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or id(p) in skip or p.device.type != "cpu":
                continue
            module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is None or id(b) in skip or b.device.type != "cpu":
                continue
            module._buffers[name] = b.clone()
