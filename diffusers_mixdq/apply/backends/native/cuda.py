"""Real low-precision GEMMs on CUDA for layers whose plan quantizes both weight and input (W8A8, FP8).

Written for, but not yet run on, a GPU (the CI machine has none). The input goes through the same
transformation as on the simulated path: channel balancing, the layer's activation scheme (static, with the
current timestep group's scale; dynamic per tensor; dynamic per token) and its codes (:func:`quantize_codes`),
so the real GEMM sees exactly the codes the simulated path rescales; only the GEMM's accumulation differs. The
pieces here are device-agnostic (``torch._int_mm`` and ``torch._scaled_mm`` also run on the CPU), so the tests
run them on the CPU by widening :data:`DEVICES`; by default only CUDA calls take them.

* int8 weights x int8 inputs: ``torch._int_mm`` (int8 x int8 -> int32, cuBLASLt), rescaled by input scale
  (per tensor or per token) x weight scale (per output channel);
* float8 weights x float8 inputs on GPUs with FP8 tensor cores (compute capability 8.9+: Ada, Hopper), bf16
  models: ``torch._scaled_mm`` with row-wise scales (a scale per token, a scale per output channel).

A layer the kernels do not take (another device, shapes the kernel refuses, a scheme without a separable scale
such as the distiller's straight-through one) runs the simulated path, which gives the same values up to float
rounding.
"""

from __future__ import annotations

import torch

from ...activations import quantize_codes

#: device types whose calls take the real GEMMs (the tests add "cpu")
DEVICES = ("cuda",)


def has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def accepts(module, x: torch.Tensor) -> bool:
    """Whether a real GEMM takes this call of a native Linear (before its input is prepared)."""
    if x.device.type not in DEVICES or module.qdata is None or module.act_dtype == "none":
        return False
    if module.kept_rows is not None:  # outlier rows stored apart: the simulated path scatters the stored rows
        return False
    k, n = x.shape[-1], module.weight_shape[0]
    if module.act_dtype == "int8" and module.qbits == 8 and not module.qfloat8:
        # cuBLASLt int8 GEMM: more than 16 rows, K and N multiples of 8
        return x.numel() // k > 16 and k % 8 == 0 and n % 8 == 0
    if module.act_dtype == "float8" and module.qfloat8 and x.dtype == torch.bfloat16:
        return k % 16 == 0 and n % 16 == 0 and (x.device.type != "cuda" or has_fp8_tensor_cores(x.device))
    return False


def prepare_input(module, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, row scales)`` of the (already balanced) input: the codes as the simulated path computes them
    (int8 / float8, ``(rows, K)``) and the scale of each row in fp32 (``(rows, 1)``; per tensor: repeated)."""
    scale = scale.to(x.dtype)
    k = x.shape[-1]
    codes = quantize_codes(x, module.act_dtype, scale).reshape(-1, k)
    codes = codes.to(torch.int8) if module.act_dtype == "int8" else codes
    rows = codes.shape[0]
    return codes, scale.float().reshape(-1, 1).expand(rows, 1).contiguous()


def dequantized_input(codes: torch.Tensor, row_scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The fake-quantized input the simulated path would have passed on (for a layer's outlier rows)."""
    return (codes.to(x.dtype) * row_scales.to(x.dtype)).reshape(x.shape)


def gemm(module, codes: torch.Tensor, row_scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y = (codes @ W_codes^T) * s_x * s_w + bias`` in ``x``'s dtype and shape (``torch._int_mm`` or
    ``torch._scaled_mm``)."""
    n, k = module.weight_shape[0], x.shape[-1]
    w_scale = module.qscale.float().reshape(1, n)
    if module.act_dtype == "int8":
        acc = torch._int_mm(codes, module.qdata.reshape(n, k).t())
        y = (acc.float() * row_scales * w_scale).to(x.dtype)
        y = y if module.bias is None else y + module.bias
    else:
        weight = module.qdata.view(torch.float8_e4m3fn).reshape(n, k)
        y = torch._scaled_mm(codes, weight.t(), scale_a=row_scales, scale_b=w_scale, bias=module.bias,
                             out_dtype=x.dtype)
    return y.reshape(x.shape[:-1] + (n,))
