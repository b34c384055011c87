"""Real low-precision GEMMs for layers whose plan quantizes both weight and input: int8 weights x int8 (or int4)
input codes through ``torch._int_mm`` on the CPU and on CUDA, float8 x float8 through ``torch._scaled_mm`` on CUDA.

The input goes through the same transformation as on the simulated path: channel balancing and the low-rank
branch (the mixin's, around this op), the layer's activation scheme (static, with the current timestep group's
scale; dynamic per tensor; dynamic per token) and its codes (:func:`~...activations.quantize_codes`), so the
real GEMM sees exactly the codes the simulated path rescales. The integer GEMM is exact (int32 accumulation) where
the simulated path rounds in the float dtype; the output is ``acc * s_x * s_w + bias``, computed in fp32.

Which calls take it (:func:`accepts`): a native Linear (or 1x1 Conv2d, as the GEMM of its pixels) with int8 weights (symmetric, a scale per output channel)
and an int8 / int4 activation scheme that has a scale (every built-in one; activations have no zero point), no
outlier rows stored apart, no autograd graph to keep (the integer GEMM has no gradient), and

* on CUDA: more than 16 rows, K and N multiples of 8 (cuBLASLt's int8 GEMM);
* on the CPU, by default: calls of at least :data:`CPU_MIN_WORK` multiply-adds on a CPU with AVX-512 VNNI or AMX
  int8 instructions, where oneDNN's int8 GEMM runs 3-5x faster than the fp32 one (measured: a whole W8A8 layer,
  input quantization included, 2.6-3.5x faster than FP32 on SDXL's 1280-channel shapes, 1.1-1.3x on SD-2.1's
  320-channel ones); without those instructions it is not faster, so calls stay simulated.
  ``DIFFUSERS_MIXDQ_CPU_INT8_GEMM=1`` / ``0`` or :func:`use_cpu_int8_gemm` force it on (every call) or off. Eager
  CPU calls run a chunk of rows at a time (:data:`CHUNK_BYTES`): the input codes, the int32 accumulator and the
  rescaled rows stay in cache instead of page-faulting full-size temporaries;
* float8 weights x float8 inputs: bf16 models on GPUs with FP8 tensor cores (compute capability 8.9+), row-wise
  scales (the tests add the CPU to :data:`FP8_DEVICES`).

The weight is used as stored (``qdata``, ``(N, K)`` int8, passed transposed as a view: oneDNN reads that layout
as fast as, or faster than, a transposed-contiguous copy, measured), so nothing is added to memory. Other layers
(grouped int2 ... int6 weights, 3x3 convolutions, a scheme without a separable scale) run the simulated path, which gives
the same values up to float rounding.
"""

from __future__ import annotations

import os

import torch

from ...activations import ACT_QMAX, quantize_codes
from .. import layout
from . import packing

#: environment variable: ``1`` runs CPU calls through the int8 GEMM, ``0`` keeps them simulated; unset: by CPU
CPU_INT8_ENV = "DIFFUSERS_MIXDQ_CPU_INT8_GEMM"
#: device types whose bf16 calls take the float8 GEMM (the tests add "cpu")
FP8_DEVICES = ("cuda",)
#: activation dtypes whose codes are integers that fit int8
INT_ACTIVATIONS = ("int8", "int4")
#: bytes of one chunk's int32 accumulator (or of its input rows in fp32) on the eager CPU path
CHUNK_BYTES = 1 << 20
#: multiply-adds from which a CPU call takes the int8 GEMM by default (smaller ones: its fixed costs, measured on
#: the bundled demo UNet, outweigh the faster GEMM)
CPU_MIN_WORK = 1 << 24
#: fewest rows of a chunk (each chunk reads the whole weight again)
MIN_CHUNK_ROWS = 256


def cpu_has_int8_instructions() -> bool:
    """Whether this CPU has AVX-512 VNNI or AMX int8 instructions (oneDNN's fast int8 GEMMs)."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_vnni_supported", "_is_amx_tile_supported"))
    return any(check is not None and check() for check in checks)


def _from_environment() -> bool | None:
    """The environment's setting: ``True`` / ``False`` forced, ``None`` by CPU and size."""
    value = os.environ.get(CPU_INT8_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    from ....errors import MixDQError

    raise MixDQError(f"{CPU_INT8_ENV}={value!r} is not understood; set it to 1 (int8 GEMM on the CPU), 0 (simulated) "
                     "or leave it unset (on where the CPU has VNNI / AMX).")


_HAS_INT8 = cpu_has_int8_instructions()
_cpu_int8 = _from_environment()


def cpu_int8_gemm_enabled() -> bool:
    """Whether CPU calls of W8A8 layers run the int8 GEMM (by default: calls of at least :data:`CPU_MIN_WORK`
    multiply-adds on a CPU with VNNI / AMX; see the module docstring)."""
    return _HAS_INT8 if _cpu_int8 is None else _cpu_int8


def use_cpu_int8_gemm(enabled: bool | None) -> bool | None:
    """Force CPU calls of W8A8 layers through the int8 GEMM (``True``, every call) or the simulated path
    (``False``); ``None``: back to the default (the environment variable, else by CPU and size). Returns the
    previous setting."""
    global _cpu_int8
    previous = _cpu_int8
    _cpu_int8 = _from_environment() if enabled is None else bool(enabled)
    return previous


def has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def accepts(module, x: torch.Tensor) -> bool:
    """Whether a real GEMM takes this call of a native Linear (before its input is quantized)."""
    if module.qdata is None or module.act_dtype == "none" or getattr(module, "outlier_weight", None) is not None:
        return False  # outlier rows (stored apart): the simulated path scatters them
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    conv = isinstance(module, torch.nn.Conv2d)
    if conv and not (module.is_pointwise and x.dim() == 4):
        return False  # 3x3 convolutions: dequantize + convolution
    k, n, device = x.shape[1 if conv else -1], module.weight_shape[0], x.device.type
    if module.act_dtype in INT_ACTIVATIONS and integer_weight(module):
        if device == "cuda":  # cuBLASLt int8 GEMM: more than 16 rows, K and N multiples of 8
            return x.numel() // k > 16 and k % 8 == 0 and n % 8 == 0
        return device == "cpu" and (_cpu_int8 or (_cpu_int8 is None and _HAS_INT8
                                                 and x.numel() // k * k * n >= CPU_MIN_WORK))
    if module.act_dtype == "float8" and module.qfloat8 and x.dtype == torch.bfloat16 and device in FP8_DEVICES \
            and not conv:
        return k % 16 == 0 and n % 16 == 0 and (device != "cuda" or has_fp8_tensor_cores(x.device))
    return False


def integer_weight(module) -> bool:
    """Whether the weight's codes fit int8 with one scale (and shift) per output channel: int8, or int2 ... int6
    with one group per output channel (``K`` <= 128 or not a multiple of 32; grouped weights are simulated)."""
    if module.qbits == 8:
        return not module.qfloat8
    return module.qbits > 0 and layout.grouping(tuple(module.weight_shape), module.qbits)[1] is None


def prepare_input(module, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, row scales)`` of the (already balanced) input: the codes as the simulated path computes them
    (int8 / float8, ``(rows, K)``) and the scale of each row in fp32 (``(rows, 1)``, or ``(1, 1)`` per tensor)."""
    scale = scale.to(x.dtype)
    codes = quantize_codes(x, module.act_dtype, scale).reshape(-1, x.shape[-1])
    codes = codes if codes.dtype == torch.float8_e4m3fn else codes.to(torch.int8)
    return codes, scale.float().reshape(-1, 1)


def weight_codes(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(codes, shift)``: the weight's integer codes ``(N, K)`` in int8 and, for an affine (2- to 6-bit, one group
    per output channel) weight, its shift ``(1, N)`` in fp32 (``w = code * scale - shift``); int8: ``None``."""
    n = module.weight_shape[0]
    if module.qbits == 8:
        return module.qdata.reshape(n, -1), None
    codes = packing.unpack(module.qdata, module.qbits, n).reshape(n, -1).view(torch.int8)  # 0 ... 2^bits - 1
    return codes, module.qshift.float().reshape(1, n)


def _int8_rows(module, x2d: torch.Tensor, scale: torch.Tensor, w_codes: torch.Tensor,
               shift: torch.Tensor | None) -> torch.Tensor:
    """``x_codes @ W^T`` rescaled (``s_x * (s_w * (x_codes @ W_codes^T) - shift * sum(x_codes))`` + bias) of rows
    ``x2d`` (their scale ``(rows or 1, 1)``), in fp32."""
    codes, row_scales = prepare_input(module, x2d, scale)
    acc = torch._int_mm(codes, w_codes.t())
    y = acc.float().mul_(module.qscale.float().reshape(1, -1))
    if shift is not None:  # the affine weight's zero point, exactly: sum_k x_k * shift = shift * sum_k x_k
        y.addr_(codes.sum(1, dtype=torch.float32), shift.reshape(-1), alpha=-1)
    y = y.mul_(row_scales)
    return y if module.bias is None else y.add_(module.bias)


def gemm(module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The layer's output on ``x`` (balanced, not yet quantized) whose activation scale is ``scale`` (0-dim per
    tensor, a kept last dim per token), in ``x``'s dtype and shape."""
    if x.dim() == 4:  # a 1x1 convolution: the GEMM of its pixels (a scale per pixel when per token), NCHW out
        b, _, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(b * h * w, -1)
        y = _gemm(module, rows, scale.permute(0, 2, 3, 1).reshape(-1, 1) if scale.dim() else scale)
        return y.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
    return _gemm(module, x, scale)


def _gemm(module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = module.weight_shape[0], x.shape[-1]
    if module.act_dtype == "float8":
        codes, row_scales = prepare_input(module, x, scale)
        weight = module.qdata.view(torch.float8_e4m3fn).reshape(n, k)
        y = torch._scaled_mm(codes, weight.t(), scale_a=row_scales.expand(codes.shape[0], 1).contiguous(),
                             scale_b=module.qscale.float().reshape(1, n), bias=module.bias, out_dtype=x.dtype)
        return y.reshape(x.shape[:-1] + (n,))
    x2d, (w_codes, shift) = x.reshape(-1, k), weight_codes(module)
    per_row = scale.reshape(-1, 1) if scale.dim() else scale
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return _cpu_chunks(module, x2d, per_row, w_codes, shift).to(x.dtype).reshape(x.shape[:-1] + (n,))
    return _int8_rows(module, x2d, per_row, w_codes, shift).to(x.dtype).reshape(x.shape[:-1] + (n,))


def _cpu_chunks(module, x2d: torch.Tensor, scale: torch.Tensor, w_codes: torch.Tensor,
                shift: torch.Tensor | None) -> torch.Tensor:
    """:func:`_int8_rows` on the eager CPU path, in fp32: a chunk of rows at a time through buffers made once per
    call (so every pass stays in cache and nothing is allocated per chunk), written into the output."""
    (rows, k), n = x2d.shape, w_codes.shape[0]
    step = min(rows, max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * max(k, n))))
    per_token = scale.dim() > 0 and scale.shape[0] > 1
    scale = scale.to(x2d.dtype)
    w_scale = module.qscale.float().reshape(1, n)
    w_scale = w_scale if per_token or shift is not None else w_scale * scale.float()  # one multiply per element
    lo, hi = -ACT_QMAX[module.act_dtype] - 1, ACT_QMAX[module.act_dtype]
    tmp, codes = x2d.new_empty((step, k)), torch.empty((step, k), dtype=torch.int8)
    acc, out = torch.empty((step, n), dtype=torch.int32), torch.empty((rows, n))
    for a in range(0, rows, step):
        r = min(step, rows - a)
        s = scale[a:a + r] if per_token else scale
        torch.div(x2d[a:a + r], s, out=tmp[:r]).round_().clamp_(lo, hi)  # the simulated path's codes
        c = codes[:r].copy_(tmp[:r])
        torch._int_mm(c, w_codes.t(), out=acc[:r])
        y = out[a:a + r].copy_(acc[:r]).mul_(w_scale)
        if shift is not None:
            y.addr_(c.sum(1, dtype=torch.float32), shift.reshape(-1), alpha=-1)
        if per_token or shift is not None:
            y.mul_(s.float())
        if module.bias is not None:
            y.add_(module.bias)
    return out
