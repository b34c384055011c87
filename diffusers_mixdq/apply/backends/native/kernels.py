"""How a native module runs its weight-quantized op: the fastest kernel available for the call.

Measured on a 1-thread x86 CPU (AVX-512, torch 2.13; ``benchmarks/kernels_cpu.py``): PyTorch's packed
weight-only kernels (``aten._weight_int8pack_mm``, ``aten._weight_int4pack_mm_for_cpu``) are GEMV kernels. They
beat dequantize + matmul only for a few rows in bf16 (the time-embedding layers of a denoiser), and are
10-100x slower than the float GEMM for the thousands of rows of a diffusion layer, and always in fp32. So:

* few rows (``<= PACKED_MAX_ROWS``), bf16, a Linear or a 1x1 Conv2d: the packed int8 kernel (int8 weights
  as stored, no copy) or the packed int4 kernel (when :func:`~.cache.prepare_int4_kernels` packed the weight);
* otherwise, eager on the CPU: dequantize in place into fresh memory and run the float GEMM / convolution, a
  weight larger than ``CHUNK_BYTES`` (in the float dtype) a slice of output channels at a time (GEMM slices
  written into the output, convolution slices copied into it). A call never holds more than ``CHUNK_BYTES`` of
  dequantized weight, where quanto holds the whole weight (up to 112 MiB for an SD-2.1 convolution), so the
  step's peak memory is at most quanto's; and slices of at most 16 MiB come back from the allocator's free
  lists instead of fresh pages of memory, which a whole large weight would page-fault in on every call;
* a weight with one scale per output channel (int8, float8) of at least ``SCALED_OUTPUT_MIN_BYTES`` whose output
  is smaller than the weight (few rows: SDXL's deep levels, 3x3 convolutions at low resolution) runs on its codes
  converted to float, and the output is scaled per channel instead of the weight (``x @ (c s)^T = (x @ c^T) s``):
  one pass over the weight fewer (the float weight is written once and read once by the GEMM, not multiplied in
  between), at the cost of a pass over the smaller output. Equal to dequantize + GEMM up to fp32 rounding (the
  scale applied after the sum instead of to each product);
* a layer that quantizes its input too (W8A8, and int2 ... int6 weights with one group per output channel,
  x int8 / int4 inputs) runs the integer GEMM of :mod:`.real_gemm` instead of anything here, wherever that
  module takes the call: on CUDA, and on CPUs with VNNI / AMX int8 instructions (``torch._int_mm``, 3-5x faster
  than the fp32 GEMM there; ``DIFFUSERS_MIXDQ_CPU_INT8_GEMM`` / ``real_gemm.use_cpu_int8_gemm`` force it on or
  off); otherwise its input is fake-quantized in the float dtype and the op runs as below;
* a module with a dequantize-once cache (:func:`~.cache.cache_dequantized`, opt-in) uses the cached weight;
* under ``torch.compile`` (or with autograd) the dequantization is plain out-of-place ops on the whole weight,
  which inductor fuses into one loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import packing

#: rows (tokens x batch) up to which the packed weight-only kernels run, for bf16 inputs on the CPU
PACKED_MAX_ROWS = 16
#: largest slice of a weight (bytes, in the float dtype) dequantized at a time on the eager CPU path
CHUNK_BYTES = 16 * 2**20
#: smallest weight (bytes, in the float dtype) whose output is scaled instead of the weight (see the docstring)
SCALED_OUTPUT_MIN_BYTES = 4 * 2**20
_PACKED_DTYPES = (torch.bfloat16,)  # fp16 GEMV kernels are slower than dequantize + GEMM here


def _eager_inplace(x: torch.Tensor) -> bool:
    """Whether the weight may be dequantized in place, in slices: eager CPU, and no autograd graph that could
    keep the weight for a backward pass."""
    if torch.compiler.is_compiling() or x.device.type != "cpu":
        return False
    return not (torch.is_grad_enabled() and x.requires_grad)


def weight(module, x: torch.Tensor) -> torch.Tensor:
    """The module's whole weight in floating point, for a call on ``x``."""
    cached = module.dequantized_cache
    if cached is not None:
        return cached
    shape = tuple(module.weight_shape)
    if _eager_inplace(x):
        return channels(module, 0, shape[0])
    return packing.dequantize(module.stored_data(), module.qscale, module.qshift, module.qbits, shape)


def channels(module, start: int, stop: int) -> torch.Tensor:
    """Output channels ``start:stop`` of the module's weight, dequantized in place into fresh memory."""
    return packing.dequantize_channels(module.stored_data(), module.qscale, module.qshift, module.qbits,
                                       tuple(module.weight_shape), start, stop)


def codes(module, start: int, stop: int) -> torch.Tensor:
    """Output channels ``start:stop`` of a per-channel-scaled weight's codes, converted to the float dtype."""
    out = torch.empty((stop - start,) + tuple(module.weight_shape[1:]), dtype=module.qscale.dtype,
                      device=module.qdata.device)
    return out.copy_(module.stored_data()[start:stop])


def scales_output(module, x: torch.Tensor, rows: int) -> bool:
    """Whether a call on ``rows`` rows (output positions) scales the output instead of the weight: one scale per
    output channel, a large weight, more weight than output elements, the eager CPU path."""
    if module.qbits != 8 or module.dequantized_cache is not None or not _eager_inplace(x):
        return False
    per_channel = 1
    for s in module.weight_shape[1:]:
        per_channel *= s
    weight_bytes = per_channel * module.weight_shape[0] * module.qscale.element_size()
    return weight_bytes >= SCALED_OUTPUT_MIN_BYTES and rows < per_channel


def _rescale(out: torch.Tensor, module, dim: int) -> torch.Tensor:
    """``out`` (codes' products) times the per-channel scales, + bias, in place; channels along ``dim``."""
    shape = [1] * out.dim()
    shape[dim] = -1
    out.mul_(module.qscale.reshape(shape))
    return out if module.bias is None else out.add_(module.bias.reshape(shape))


def slices(module, x: torch.Tensor) -> list[tuple[int, int]] | None:
    """Output-channel slices of about :data:`CHUNK_BYTES` each for this call, or ``None``: one whole weight
    (small enough, a cached weight, or not the eager CPU path)."""
    shape = module.weight_shape
    per_channel = module.qscale.element_size()
    for s in shape[1:]:
        per_channel *= s
    if module.dequantized_cache is not None or per_channel * shape[0] <= CHUNK_BYTES or not _eager_inplace(x):
        return None
    count = -(-per_channel * shape[0] // CHUNK_BYTES)
    step = -(-shape[0] // count)
    return [(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]


def _packed_kernel(module, rows: int, x: torch.Tensor):
    """The packed weight-only kernel for a call of ``rows`` rows, or ``None`` (dequantize + GEMM is faster)."""
    if rows > PACKED_MAX_ROWS or x.dtype not in _PACKED_DTYPES or x.device.type != "cpu":
        return None
    if module.dequantized_cache is not None or module.qscale.dtype != x.dtype:
        return None
    if module.qbits == 8 and not module.qfloat8 and x.shape[-1 if x.dim() != 4 else 1] % 16 == 0:
        # torch 2.13's int8 kernel crashes (segfault) on K not a multiple of 16
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
    if kernel is not None:
        out = kernel(x.reshape(rows, x.shape[-1]).contiguous())
        out = out.reshape(x.shape[:-1] + (out.shape[-1],))
        return out if module.bias is None else out + module.bias
    parts, scaled = slices(module, x), scales_output(module, x, rows)
    if parts is None and not scaled:
        return F.linear(x, weight(module, x), module.bias)
    x2d = x.reshape(rows, x.shape[-1])
    out = x2d.new_empty((rows, module.weight_shape[0]))
    for a, b in parts or [(0, module.weight_shape[0])]:
        w = (codes if scaled else channels)(module, a, b).t()
        if module.bias is None or scaled:
            torch.mm(x2d, w, out=out[:, a:b])
        else:
            torch.addmm(module.bias[a:b], x2d, w, out=out[:, a:b])
    if scaled:
        _rescale(out, module, 1)
    return out.reshape(x.shape[:-1] + (out.shape[-1],))


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
    parts = slices(module, x) if x.dim() == 4 else None
    scaled = x.dim() == 4 and scales_output(module, x, x.shape[0] * x.shape[2] * x.shape[3] // _stride_area(module))
    if parts is None and not scaled:
        return module._conv_forward(x, weight(module, x), module.bias)
    if parts is None:
        return _rescale(module._conv_forward(x, codes(module, 0, module.weight_shape[0]), None), module, 1)
    out = None
    for a, b in parts:
        bias = None if module.bias is None or scaled else module.bias[a:b]
        part = module._conv_forward(x, (codes if scaled else channels)(module, a, b), bias)
        if out is None:
            out = part.new_empty((part.shape[0], module.weight_shape[0]) + tuple(part.shape[2:]))
        out[:, a:b].copy_(part)
        del part
    return _rescale(out, module, 1) if scaled else out


def _stride_area(module) -> int:
    stride = module.stride if isinstance(module.stride, tuple) else (module.stride,) * 2
    return max(1, stride[0] * stride[1])
