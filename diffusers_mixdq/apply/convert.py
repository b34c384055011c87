"""Quantizing modules that already live in memory (calibration and sensitivity sweeps, benchmarks).

The counterpart of what ``from_pretrained`` does while streaming a checkpoint (``quantizer.py``); both go through
the default weight backend.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..plan import LayerSpec
from .backends import backend_for, backend_of
from .bos_rows import finish_bos_, set_bos_state
from .corrections import attach_corrections
from .swap import quantize_placed_weight_


def quantize_module(module: nn.Module, spec: LayerSpec, bos_state: torch.Tensor | None = None,
                    tensors: Mapping[str, torch.Tensor] | None = None, name: str = "",
                    backend: str | None = None) -> nn.Module:
    """A quantized copy of an in-memory Linear / Conv2d (the original is left untouched), made by weight backend
    ``backend`` (``None``: the default, or the one :func:`~.backends.use_weight_backend` imposes); ``tensors`` (a
    plan's sidecar) and the layer's ``name`` give it the balance / low-rank tensors its spec's flags name."""
    backend = backend_for(backend, [spec])
    dtype = module.weight.dtype
    qmodule = backend.make_module(module, spec, scale_dtype=dtype)
    attach_corrections(qmodule, name, spec, tensors or {})
    qmodule.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)
    if module.bias is not None:
        qmodule.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    qmodule.move_scales_to_weight_device()
    if qmodule.bos_aware:
        if bos_state is None:
            raise ValueError("a BOS-aware layer needs the BOS hidden state")
        set_bos_state(qmodule, bos_state)
    quantize_placed_weight_(backend, qmodule)  # the steps from_pretrained takes for each placed weight
    if qmodule.bos_aware:
        finish_bos_(qmodule, dtype)
    return qmodule


def describe(module: nn.Module) -> tuple[str, str]:
    """(weight dtype, activation dtype) of a module, in plan vocabulary; ``("none", "none")`` if not quantized."""
    backend = backend_of(module)
    if backend is None:
        return "none", "none"
    return backend.weight_dtype(module), module.act_dtype
