"""Outlier channels in a wider weight format (MPQ-DM's outlier-driven mixed quantization, OMQ), backend-independent.

A layer whose plan entry has ``outliers: {"weights": "int8", "channels": [...]}`` keeps the listed output
channels' rows at int8 (symmetric, one scale per row) in three buffers saved with pre-quantized checkpoints, and
its quantized weight holds the other rows only (the native backend, which such plans load into: each row is
stored once):

* ``outlier_channels`` (``(k,)`` int64), ``outlier_weight`` (``(k, in_features)`` int8),
  ``outlier_scale`` (``(k,)``, the model's float dtype).

The module's output is the backend's on the other rows, with the outlier channels from the int8 rows' output on
the same quantized input. Sizes count each row once (:func:`diffusers_mixdq.plan.extras.outlier_bits`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PlanMismatchError
from ..plan import LayerSpec

OUTLIER_BUFFERS = ("outlier_channels", "outlier_weight", "outlier_scale")


def configure_outliers(module: nn.Module, spec: LayerSpec, scale_dtype: torch.dtype) -> None:
    """Give ``module`` the outlier buffers of ``spec``: channels filled now, rows on meta until
    :func:`compute_outlier_rows_` (full-precision checkpoint) or a pre-quantized checkpoint fills them."""
    channels = spec.outlier_channels
    if not channels:
        return
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise PlanMismatchError(f"Outlier channels need an ungrouped Conv2d; this one has groups={module.groups}. "
                                "Remove 'outliers' from its plan entry.")
    rows = module.weight.shape[0]
    if max(channels) >= rows:
        raise PlanMismatchError(f"The plan's outlier channels include {max(channels)}, but the layer has {rows}.")
    k, per_row = len(channels), module.weight[0].numel()
    module.register_buffer("outlier_channels", torch.tensor(channels, dtype=torch.int64))
    module.register_buffer("outlier_weight", torch.empty(k, per_row, dtype=torch.int8, device="meta"))
    module.register_buffer("outlier_scale", torch.empty(k, dtype=scale_dtype, device="meta"))


def has_outliers(module: nn.Module) -> bool:
    return getattr(module, "outlier_weight", None) is not None


def int8_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` (``(k, n)``) quantized symmetrically to int8, one scale per row: ``(values, scales)``."""
    scale = rows.detach().float().abs().amax(dim=1).clamp_min(1e-12) / 127.0
    values = torch.clamp(torch.round(rows.detach().float() / scale[:, None]), -127, 127).to(torch.int8)
    return values, scale


def compute_outlier_rows_(module: nn.Module) -> None:
    """Fill the outlier rows from the module's still full-precision weight (before the backend quantizes it)."""
    channels = module.outlier_channels.to(module.weight.device)
    rows = module.weight.detach().index_select(0, channels).flatten(1)
    values, scale = int8_rows(rows)
    module.outlier_channels = channels
    module.outlier_weight = values
    module.outlier_scale = scale.to(module.outlier_scale.dtype)


def outlier_forward(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` (the backend's output on the quantized input ``x``) with the outlier channels from the int8 rows."""
    channels = module.outlier_channels
    w = module.outlier_weight.to(y.dtype) * module.outlier_scale.to(y.dtype)[:, None]
    bias = None if module.bias is None else module.bias.index_select(0, channels).to(y.dtype)
    if isinstance(module, nn.Conv2d):
        part = nn.Conv2d._conv_forward(module, x.to(y.dtype), w.view(-1, *module.weight.shape[1:]), bias)
        return y.index_copy(1, channels, part)
    part = nn.functional.linear(x.to(y.dtype), w, bias)
    return y.index_copy(y.dim() - 1, channels, part)
