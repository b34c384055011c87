"""Calibration: record the input range (absolute max) of every quantizable layer while the model runs."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..plan.layers import layer_table


def record_input_ranges(
    model: nn.Module,
    run: Callable[[], Any],
    layers: Iterable[str] | None = None,
    skip_first_token: Iterable[str] = (),
    momentum: float | None = None,
) -> dict[str, float]:
    """Run ``run()`` (which calls ``model`` any number of times) and return each layer's input absmax.

    Args:
        layers: names to record (default: every Linear / Conv2d).
        skip_first_token: layers whose token 0 is left out (BOS-aware layers: their BOS row never goes through
            the quantized path, so it must not widen the range). Applies to 3-D ``(batch, tokens, features)``
            inputs.
        momentum: ``None`` keeps the maximum over all calls; a float ``m`` keeps an exponential moving average
            ``r = m * r + (1 - m) * absmax`` (MixDQ uses 0.95), seeded with the first call's absmax.
    """
    names = list(layers) if layers is not None else list(layer_table(model))
    skip = set(skip_first_token)
    ranges: dict[str, float] = {}
    handles = []

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            if name in skip and x.dim() == 3:
                x = x[:, 1:]
            if x.numel() == 0:
                return
            value = float(x.detach().abs().amax())
            if name not in ranges:
                ranges[name] = value
            elif momentum is None:
                ranges[name] = max(ranges[name], value)
            else:
                ranges[name] = momentum * ranges[name] + (1 - momentum) * value

        return hook

    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook_for(name)))
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return ranges
