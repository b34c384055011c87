"""Real low-precision GEMMs on CUDA for layers whose plan quantizes both weight and input (W8A8, FP8).

Written for, but not yet run on, a GPU (the CI machine has none; ``tests/test_native_backend.py`` runs these on
CUDA only, ``benchmarks/kernels_cuda.py`` measures them). Each function returns ``None`` when its kernel does
not take the call (another device, shapes the kernel refuses, an activation scheme it does not know); the
caller then takes the simulated path (quantize the input in floating point, dequantized weight, float GEMM),
which gives the same values up to float rounding.

* int8 weights x int8 inputs: ``torch._int_mm`` (int8 x int8 -> int32, cuBLASLt), the input quantized per
  tensor (static scale from the plan, or dynamic from its absolute maximum) or per token (the
  ``"dynamic-token"`` scheme), rescaled by input scale x weight scale per output channel;
* float8 weights x float8 inputs on GPUs with FP8 tensor cores (compute capability 8.9+: Ada, Hopper):
  ``torch._scaled_mm`` with row-wise scales (a scale per token, a scale per output channel), bf16 output.
"""

from __future__ import annotations

import torch

from ....plan.spec import DYNAMIC_TOKEN
from ...activations import ACT_QMAX

_FLOAT8 = torch.float8_e4m3fn
_FLOAT8_MAX = float(torch.finfo(_FLOAT8).max)
_EPS = 1e-12


def _input_scales(x2d: torch.Tensor, scheme: str, input_scale: torch.Tensor, qmax: float) -> torch.Tensor | None:
    """fp32 scales of the input rows, ``(rows, 1)`` (the same for every row unless per token)."""
    if scheme == "static":
        scale = input_scale.float().reshape(1, 1)
    elif scheme == "dynamic":
        scale = x2d.detach().abs().amax().float().clamp_min(_EPS).reshape(1, 1) / qmax
    elif scheme == DYNAMIC_TOKEN:
        scale = x2d.detach().abs().amax(dim=1, keepdim=True).float().clamp_min(_EPS) / qmax
    else:
        return None
    return scale.expand(x2d.shape[0], 1)


def int8_linear(module, x: torch.Tensor, scheme: str) -> torch.Tensor | None:
    """``y = (q_x @ q_w^T) * s_x * s_w + bias`` through ``torch._int_mm``, or ``None``."""
    if x.device.type != "cuda" or module.qbits != 8 or module.qfloat8 or module.act_dtype != "int8":
        return None
    k, n = x.shape[-1], module.weight_shape[0]
    rows = x.numel() // k
    if rows <= 16 or k % 8 or n % 8:  # cuBLASLt int8 GEMM: more than 16 rows, K and N multiples of 8
        return None
    x2d = x.reshape(rows, k)
    scales = _input_scales(x2d, scheme, module.input_scale, ACT_QMAX["int8"])
    if scales is None:
        return None
    q = torch.clamp(torch.round(x2d.float() / scales), -128, 127).to(torch.int8)
    acc = torch._int_mm(q, module.qdata.reshape(n, k).t())
    y = acc.float() * scales * module.qscale.float().reshape(1, n)
    y = y.to(x.dtype)
    if module.bias is not None:
        y = y + module.bias
    return y.reshape(x.shape[:-1] + (n,))


def has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(module, x: torch.Tensor, scheme: str) -> torch.Tensor | None:
    """``torch._scaled_mm`` of float8 input and weight with row-wise scales (bf16 models), or ``None``."""
    if not module.qfloat8 or module.act_dtype != "float8" or x.dtype != torch.bfloat16:
        return None
    if not has_fp8_tensor_cores(x.device):
        return None
    k, n = x.shape[-1], module.weight_shape[0]
    rows = x.numel() // k
    if k % 16 or n % 16:
        return None
    x2d = x.reshape(rows, k)
    scales = _input_scales(x2d, scheme, module.input_scale, _FLOAT8_MAX)
    if scales is None:
        return None
    q = torch.clamp(x2d.float() / scales, -_FLOAT8_MAX, _FLOAT8_MAX).to(_FLOAT8)
    weight = module.qdata.view(_FLOAT8).reshape(n, k)
    y = torch._scaled_mm(q, weight.t(), scale_a=scales.contiguous(), scale_b=module.qscale.float().reshape(1, n),
                         bias=module.bias, out_dtype=torch.bfloat16)
    return y.reshape(x.shape[:-1] + (n,))


def real_linear(module, x: torch.Tensor) -> torch.Tensor | None:
    """The real low-precision GEMM for this call of a native Linear, or ``None`` (then: simulated)."""
    if x.device.type != "cuda" or module.qdata is None or module.act_dtype == "none":
        return None
    scheme = getattr(module._act_scheme, "name", "")
    return int8_linear(module, x, scheme) if module.act_dtype == "int8" else fp8_linear(module, x, scheme)
