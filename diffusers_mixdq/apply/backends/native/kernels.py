"""How a native module runs its weight-quantized op: the fastest kernel available for the call.

Measured on a 1-thread x86 CPU (AVX-512, torch 2.13; ``benchmarks/kernels_cpu.py``): PyTorch's packed
weight-only kernels (``aten._weight_int8pack_mm``, ``aten._weight_int4pack_mm_for_cpu``) are GEMV kernels. They
beat dequantize + matmul only for a few rows in bf16 (the time-embedding layers of a denoiser), and are
10-100x slower than the float GEMM for the thousands of rows of a diffusion layer, and always in fp32. So:

* few rows (``<= PACKED_MAX_ROWS``), bf16, a Linear or a 1x1 Conv2d: the packed int8 kernel (int8 weights
  as stored, no copy) or the packed int4 kernel (when :func:`~.cache.prepare_int4_kernels` packed the weight);
* otherwise: dequantize (into a per-thread workspace reused by every layer of up to ``WORKSPACE_MAX_BYTES``, so
  no fresh allocation and page faults per call; quanto's dequantization allocates each time) and run the float
  GEMM / convolution;
* a module with a dequantize-once cache (:func:`~.cache.cache_dequantized`, opt-in) uses the cached weight;
* under ``torch.compile`` the dequantization is plain out-of-place ops, which inductor fuses into one loop.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from . import packing

#: rows (tokens x batch) up to which the packed weight-only kernels run, for bf16 inputs on the CPU
PACKED_MAX_ROWS = 16
#: largest weight (bytes, in the float dtype) dequantized into the shared workspace; larger ones get memory of
#: their own per call, as quanto does, so the workspace adds at most this to the peak memory of a step
WORKSPACE_MAX_BYTES = 64 * 2**20
_PACKED_DTYPES = (torch.bfloat16,)  # fp16 GEMV kernels are slower than dequantize + GEMM here
_LOCAL = threading.local()


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of ``numel`` elements owned by this thread, grown as needed and reused by every layer
    (a fresh tensor above :data:`WORKSPACE_MAX_BYTES`)."""
    if numel * dtype.itemsize > WORKSPACE_MAX_BYTES:
        return torch.empty(numel, dtype=dtype, device=device)
    buffers = _LOCAL.__dict__.setdefault("buffers", {})
    key = (dtype, device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buffers.pop(key, None)
        buf = torch.empty(numel, dtype=dtype, device=device)
        buffers[key] = buf
    return buf[:numel]


def release_workspace() -> int:
    """Free this thread's dequantization buffers; returns the bytes freed."""
    buffers = _LOCAL.__dict__.pop("buffers", {})
    return sum(b.numel() * b.element_size() for b in buffers.values())


def _eager_inplace(x: torch.Tensor) -> bool:
    """Whether the weight may be dequantized into the shared workspace: eager CPU, and no autograd graph that
    could keep the weight for a backward pass."""
    if torch.compiler.is_compiling() or x.device.type != "cpu":
        return False
    return not (torch.is_grad_enabled() and x.requires_grad)


def weight(module, x: torch.Tensor) -> torch.Tensor:
    """The module's weight in floating point, for a call on ``x``."""
    cached = module.dequantized_cache
    if cached is not None:
        return cached
    data = module.stored_data()
    shape = tuple(module.weight_shape)
    if _eager_inplace(x):
        numel = 1
        for s in shape:
            numel *= s
        out = workspace(numel, module.qscale.dtype, x.device).view(shape)
        codes = None
        if module.qbits < 8:
            rows = packing.code_buffer_rows(module.qbits, packing.grouping(shape, module.qbits)[0])
            codes = workspace(data[0].numel() * rows, torch.uint8, x.device).view((rows,) + tuple(data.shape[1:]))
        return packing.dequantize_into(out, data, module.qscale, module.qshift, module.qbits, codes)
    return packing.dequantize(data, module.qscale, module.qshift, module.qbits, shape)


def _packed_kernel(module, rows: int, x: torch.Tensor):
    """The packed weight-only kernel for a call of ``rows`` rows, or ``None`` (dequantize + GEMM is faster)."""
    if rows > PACKED_MAX_ROWS or x.dtype not in _PACKED_DTYPES or x.device.type != "cpu":
        return None
    if module.dequantized_cache is not None or module.qscale.dtype != x.dtype:
        return None
    if module.qbits == 8 and not module.qfloat8:
        scales = module.qscale.reshape(-1)
        return lambda x2d: torch.ops.aten._weight_int8pack_mm(x2d, module.qdata.reshape(module.qdata.shape[0], -1),
                                                               scales)
    packed = getattr(module, "int4_packed", None)
    if module.qbits == 4 and packed is not None:
        return lambda x2d: torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, packed, module.int4_group,
                                                                      module.int4_scale_zeros)
    return None


def linear(module, x: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for a native Linear."""
    if module.qdata is None:
        return F.linear(x, module.weight, module.bias)
    rows = x.numel() // x.shape[-1]
    kernel = _packed_kernel(module, rows, x)
    if kernel is None:
        return F.linear(x, weight(module, x), module.bias)
    out = kernel(x.reshape(rows, x.shape[-1]).contiguous())
    out = out.reshape(x.shape[:-1] + (out.shape[-1],))
    return out if module.bias is None else out + module.bias


def conv2d(module, x: torch.Tensor) -> torch.Tensor:
    """The convolution of a native Conv2d (1x1 convolutions through the Linear kernels)."""
    if module.qdata is None:
        return module._conv_forward(x, module.weight, module.bias)
    if module.is_pointwise and x.dim() == 4:
        rows = x.shape[0] * x.shape[2] * x.shape[3]
        kernel = _packed_kernel(module, rows, x)
        if kernel is not None:
            x2d = x.permute(0, 2, 3, 1).reshape(rows, x.shape[1]).contiguous()
            out = kernel(x2d)
            out = out if module.bias is None else out + module.bias
            return out.reshape(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2)
    return module._conv_forward(x, weight(module, x), module.bias)
