"""The BOS rows of BOS-aware modules: computed from the full-precision weight before it is quantized."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def set_bos_state(module: nn.Module, state: torch.Tensor) -> None:
    """Give a BOS-aware module the BOS hidden state (its output row is computed by :func:`compute_bos_row_`)."""
    module.bos_input = state.detach().to(torch.float32).reshape(-1).clone()
    module.bos_output = torch.zeros(module.out_features, dtype=torch.float32)
    module._bos_pending = True


def compute_bos_row_(module: nn.Module) -> None:
    """``bos_output = W @ bos_input`` from the module's weight while it is still full precision (no bias yet:
    the bias may be read later; :func:`finish_bos_` adds it)."""
    if module.weight_is_quantized():
        raise RuntimeError("BOS rows must be computed from the full-precision weight, before quantization")
    weight = module.weight
    module.bos_output = F.linear(module.bos_input.to(weight.device), weight.detach().float())
    module._bos_pending = "bias"


def finish_bos_(module: nn.Module, dtype: torch.dtype) -> None:
    """Add the bias to the BOS row and cast both BOS buffers to the model dtype and device."""
    if getattr(module, "_bos_pending", False) is True:
        compute_bos_row_(module)  # weight kept in floating point: it was loaded without being quantized
    device = module.weight.device
    row = module.bos_output.to(device)
    if module.bias is not None:
        row = row + module.bias.detach().float()
    module.bos_output = row.to(dtype)
    module.bos_input = module.bos_input.to(device=device, dtype=dtype)
    module._bos_pending = False
