"""The tensors a plan carries (its safetensors sidecar), checked against what the plan's JSON records about them.

The text encoder's BOS hidden state (``bos.hidden_state``): ``target.bos`` records its ``sha256``
(of its fp32 bytes) and ``dim``. Every recorded hash is verified, the size must be ``dim`` and every value finite,
so a corrupted or swapped sidecar is one clear error when the plan is loaded, never NaN output or a crash mid-load.
Per-layer tensors (channel balancing, low-rank factors) are checked by :mod:`.layer_tensors`.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch

from ..errors import PlanFormatError
from .layer_tensors import check_layer_tensors
from .spec import BOS_STATE_KEY


def state_sha256(state: torch.Tensor) -> str:
    """Hash of a BOS state (fp32 bytes); identifies the state in plans and model cards."""
    return hashlib.sha256(state.detach().to(torch.float32).cpu().contiguous().numpy().tobytes()).hexdigest()


def check_tensors(target: Mapping[str, Any], tensors: dict[str, Any], where: str = "",
                  layers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``tensors``, after checking each against the plan's records (``layers``: the plan's per-layer table, whose
    balance / low-rank flags name sidecar tensors, :mod:`.layer_tensors`); raises :class:`PlanFormatError`."""
    sidecar = f"The plan's tensor sidecar{' ' + where if where else ''}"
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise PlanFormatError(f"{sidecar} holds {key!r} as a {type(value).__name__}; plan tensors are torch "
                                  "tensors.")
    check_layer_tensors(layers or {}, target.get("layers"), tensors, sidecar)
    state = tensors.get(BOS_STATE_KEY)
    bos = target.get("bos")
    if state is None or not bos:
        return tensors
    fix = "Re-attach the state with diffusers_mixdq.bos.attach_bos() and save the plan again (or restore the " \
          "sidecar saved with this plan)."
    if not state.is_floating_point() or state.numel() != bos["dim"]:
        raise PlanFormatError(f"{sidecar} holds a BOS state of {state.numel()} {state.dtype} values, but the plan "
                              f"records a {bos['dim']}-dim state (target.bos.dim). {fix}")
    if not bool(torch.isfinite(state).all()):
        raise PlanFormatError(f"{sidecar} holds a BOS state with NaN or infinite values; BOS rows computed from it "
                              f"would turn every output into NaN. {fix}")
    digest = state_sha256(state)
    if digest != bos["sha256"]:
        raise PlanFormatError(f"{sidecar} holds a BOS state whose sha256 ({digest[:12]}…) is not the one the plan "
                              f"records (target.bos.sha256 {bos['sha256'][:12]}…): the sidecar was changed or "
                              f"belongs to another plan. {fix}")
    return tensors
