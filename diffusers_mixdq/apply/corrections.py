"""Channel balancing and the low-rank correction branch of a MixDQ module (backend-independent, torch only).

A layer whose spec has ``flags.balance`` / ``flags.lowrank`` (format: :mod:`diffusers_mixdq.plan.layer_tensors`)
gets its sidecar tensors as non-persistent buffers (:func:`attach_corrections`; they travel with the plan file, not
with the checkpoint). Before the weight backend quantizes the full-precision weight, the weight becomes
``W diag(s) - up @ down`` (:func:`prepare_weight_`); the forward is then (:func:`corrected_forward`)::

    x' = x / s                      # balanced input (Linear: last dim; Conv2d: channel dim)
    y  = Q(W diag(s) - up @ down) Q(x') + up @ (down @ x') [+ adapter_up @ (adapter_down @ x')]

so with activations and weights left unquantized it is exactly ``W x`` (up to rounding). A pre-quantized
checkpoint already holds the corrected weight, so it is never corrected twice.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PlanFormatError, PlanMismatchError
from ..plan import LayerSpec
from ..plan.layer_tensors import ADAPTER, BALANCE, LOWRANK, balance_key, lowrank_keys

#: the buffers a corrected module carries (absent on the others)
CORRECTION_BUFFERS = ("mixdq_balance", "lowrank_down", "lowrank_up", "adapter_down", "adapter_up")


def _sidecar_tensor(tensors: Mapping[str, torch.Tensor], key: str, name: str, flag: str) -> torch.Tensor:
    value = tensors.get(key)
    if value is None:
        raise PlanFormatError(f"Layer '{name}' has flags.{flag}, but the plan carries no sidecar tensor {key!r}. "
                              "Load the plan together with its .safetensors sidecar (or rebuild it).")
    return value


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy: the same values in the same layout whether they come from the builder (an SVD's strides)
    or from the sidecar file, so the branch's matmuls round the same way."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def attach_corrections(module: nn.Module, name: str, spec: LayerSpec, tensors: Mapping[str, torch.Tensor]) -> None:
    """Give ``module`` the balance / low-rank tensors its spec's flags name (no-op without such flags), in their
    stored dtype (float16 as the builder writes them; cast to the input's dtype when used)."""
    flags = spec.flags
    if not (flags.get(BALANCE) or flags.get(LOWRANK) or flags.get(ADAPTER)):
        return
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
        raise PlanMismatchError(f"Layer '{name}' is a grouped or non-zero-padded Conv2d; channel balancing and "
                                "low-rank branches need groups=1 and zero padding. Remove its balance / lowrank flags.")
    if flags.get(BALANCE):
        s = _sidecar_tensor(tensors, balance_key(name), name, BALANCE)
        module.register_buffer("mixdq_balance", _own(s), persistent=False)
    for flag in (LOWRANK, ADAPTER):
        if flags.get(flag):
            down, up = (_sidecar_tensor(tensors, k, name, flag) for k in lowrank_keys(name, flag))
            module.register_buffer(f"{flag}_down", _own(down), persistent=False)
            module.register_buffer(f"{flag}_up", _own(up), persistent=False)
    module.mixdq_corrected = True


def _channel_view(s: torch.Tensor, ndim: int) -> torch.Tensor:
    """``s`` shaped to scale dim 1 of a weight (or conv input) with ``ndim`` dims."""
    return s.view(1, -1, *([1] * (ndim - 2)))


def corrected_weight(weight: torch.Tensor, balance: torch.Tensor | None = None, down: torch.Tensor | None = None,
                     up: torch.Tensor | None = None) -> torch.Tensor:
    """``W diag(s) - up @ down`` (computed in float32, returned in the weight's dtype); Conv2d weights are scaled
    per input channel and the low-rank product is laid out as the kernel."""
    w = weight.detach().to(torch.float32)
    if balance is not None:
        w = w * _channel_view(balance.to(w.device, torch.float32), w.dim())
    if down is not None and up is not None:
        w = w - (up.to(w.device, torch.float32) @ down.to(w.device, torch.float32)).view_as(w)
    return w.to(weight.dtype)


def module_corrections(module: nn.Module) -> tuple[torch.Tensor | None, ...]:
    """``(balance, down, up)`` of a module's balancing and absorbed low-rank part (``None`` where it has none)."""
    return tuple(getattr(module, k, None) for k in CORRECTION_BUFFERS[:3])


def prepare_weight_(module: nn.Module) -> None:
    """Replace the module's just-loaded full-precision weight by its corrected weight (before quantization)."""
    if not getattr(module, "mixdq_corrected", False):
        return
    module.weight = nn.Parameter(corrected_weight(module.weight, *module_corrections(module)), requires_grad=False)


def lowrank_branch(module: nn.Module, x: torch.Tensor, flag: str = LOWRANK) -> torch.Tensor:
    """``up @ (down @ x)`` in ``x``'s dtype (Conv2d: ``down`` as a kernel of the layer's geometry, ``up`` 1x1), with
    the module's ``lowrank`` or ``adapter`` factors."""
    down, up = getattr(module, f"{flag}_down").to(x.dtype), getattr(module, f"{flag}_up").to(x.dtype)
    if isinstance(module, nn.Conv2d):
        kernel = down.view(down.shape[0], -1, *module.kernel_size)
        h = F.conv2d(x, kernel, None, module.stride, module.padding, module.dilation)
        return F.conv2d(h, up[:, :, None, None])
    return F.linear(F.linear(x, down), up)


def balance_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x / s`` along the input-channel dimension (no-op without balancing)."""
    s = getattr(module, "mixdq_balance", None)
    if s is None:
        return x
    s = s.to(x.dtype)
    return x / (_channel_view(s, x.dim()) if isinstance(module, nn.Conv2d) else s)


def corrected_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The quantized path of a corrected module: balanced input, quantized op (with its outlier rows and
    timestep-group scales), plus the low-rank branch."""
    x = balance_input(module, x)
    y = module._quantized_op(module.quantize_input(x))
    for flag in (LOWRANK, ADAPTER):
        if getattr(module, f"{flag}_down", None) is not None:
            y = y + lowrank_branch(module, x, flag)
    return y
