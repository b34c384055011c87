"""Per-layer sidecar tensors: channel balancing and the low-rank correction branch, checked against the plan.

A layer spec may carry two flags that name tensors of the plan's safetensors sidecar:

* ``flags.balance = {"alpha": a, "sha256": h}``: sidecar ``layers.<name>.balance``, one positive factor ``s_j`` per
  input channel (Linear: ``in_features``; Conv2d: input channels, ``groups`` 1). The layer computes
  ``(W diag(s)) (x / s)``: the weight is multiplied by ``s`` before it is quantized, the input divided by ``s``
  before it is quantized (ViDiT-Q / SmoothQuant channel balancing).
* ``flags.lowrank = {"rank": r, "sha256": h}``: sidecar ``layers.<name>.lowrank.down`` (``r x in_features``) and
  ``layers.<name>.lowrank.up`` (``out x r``). The weight that is quantized is ``W diag(s) - up @ down`` and the layer
  adds ``up @ (down @ x')`` in floating point (SVDQuant: the low-rank branch absorbs the dominant part of the
  weight, the residual is quantized).
* ``flags.adapter = {"rank": r, "sha256": h}``: sidecar ``layers.<name>.adapter.down`` / ``.up``, shaped as the
  low-rank factors; the layer adds ``up @ (down @ x')`` and nothing is subtracted from the weight (a LoRA-style
  correction, trained by the builder's distill stage against full precision).

``sha256`` covers the tensors' float32 bytes in that order (:func:`tensors_sha256`). :func:`check_layer_tensors`
verifies presence, shape, finiteness (and positivity of ``s``) and hashes, so a corrupted, missing or swapped sidecar
tensor is one :class:`~diffusers_mixdq.errors.PlanFormatError` when the plan is loaded.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch

from ..errors import PlanFormatError
from .layers import LayerInfo

BALANCE = "balance"
LOWRANK = "lowrank"
ADAPTER = "adapter"
#: the flags that name per-layer sidecar tensors, in the order they are checked
TENSOR_FLAGS = (BALANCE, LOWRANK, ADAPTER)
#: sidecar key prefix of per-layer tensors
LAYER_PREFIX = "layers."


def balance_key(layer: str) -> str:
    return f"{LAYER_PREFIX}{layer}.balance"


def lowrank_keys(layer: str, flag: str = LOWRANK) -> tuple[str, str]:
    """``(down, up)`` sidecar keys of a layer's low-rank factors (``flag``: ``lowrank`` or ``adapter``)."""
    return f"{LAYER_PREFIX}{layer}.{flag}.down", f"{LAYER_PREFIX}{layer}.{flag}.up"


def tensors_sha256(*tensors: torch.Tensor) -> str:
    """Hash of tensors' float32 bytes, in order (what ``flags.balance`` / ``flags.lowrank`` record)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def expected_shapes(flag: str, info: LayerInfo, rank: int = 0) -> dict[str, tuple[int, ...]]:
    """The shapes, by role, of a layer's ``flag`` tensors (``balance``: ``s``; ``lowrank``: ``down``, ``up``)."""
    if flag == BALANCE:
        return {"s": (info.shape[1],)}
    return {"down": (rank, info.in_features), "up": (info.shape[0], rank)}


def layer_flag_tensors(name: str, flag: str) -> list[str]:
    return [balance_key(name)] if flag == BALANCE else list(lowrank_keys(name, flag))


def check_layer_tensors(layers: Mapping[str, Any], manifest: Mapping[str, Any] | None, tensors: Mapping[str, Any],
                        sidecar: str) -> None:
    """Raise :class:`PlanFormatError` unless every balance / low-rank flag of ``layers`` has its sidecar tensors,
    of the right shape (against ``manifest``, the plan's ``target.layers``), finite, and with the recorded hash; and
    every ``layers.*`` sidecar tensor belongs to such a flag."""
    claimed: set[str] = set()
    fix = "Restore the sidecar saved with this plan, or rebuild the plan."
    for name, entry in layers.items():
        flags = (entry or {}).get("flags") or {}
        for flag in TENSOR_FLAGS:
            record = flags.get(flag)
            if not record:
                continue
            keys = layer_flag_tensors(name, flag)
            claimed.update(keys)
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise PlanFormatError(f"Layer '{name}' has flags.{flag}, but {sidecar} has no {', '.join(missing)}. "
                                      f"{fix}")
            values = [tensors[k] for k in keys]
            _check_values(name, flag, record, keys, values, manifest, sidecar, fix)
    stray = sorted(k for k in tensors if k.startswith(LAYER_PREFIX) and k not in claimed)
    if stray:
        raise PlanFormatError(f"{sidecar} holds {stray[0]!r}{' and more' if len(stray) > 1 else ''}, which no layer "
                              f"flag of the plan records: the sidecar belongs to another plan. {fix}")


def _check_values(name, flag, record, keys, values, manifest, sidecar, fix) -> None:
    info = LayerInfo.from_json(manifest[name]) if manifest and name in manifest else None
    if info is not None:
        want = expected_shapes(flag, info, int(record.get("rank", 0)))
        for key, value, shape in zip(keys, values, want.values()):
            if tuple(value.shape) != shape:
                raise PlanFormatError(f"{sidecar} holds {key} of shape {list(value.shape)}; layer '{name}' "
                                      f"({info.type} {list(info.shape)}) needs {list(shape)}. {fix}")
    for key, value in zip(keys, values):
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise PlanFormatError(f"{sidecar} holds {key} with non-float, NaN or infinite values. {fix}")
    if flag == BALANCE and not bool((values[0] > 0).all()):
        raise PlanFormatError(f"{sidecar} holds {keys[0]} with factors <= 0; balancing factors are positive. {fix}")
    digest = tensors_sha256(*values)
    if digest != record.get("sha256"):
        raise PlanFormatError(f"{sidecar} holds {flag} tensors of layer '{name}' whose sha256 ({digest[:12]}…) is "
                              f"not the one the plan records (flags.{flag}.sha256): the sidecar was changed or "
                              f"belongs to another plan. {fix}")


#: stored bits per element: balancing and low-rank factors are float16 (the builder writes them so)
BALANCE_BITS = 16
LOWRANK_BITS = 16


def extra_bits(flags: Mapping[str, Any], info: LayerInfo) -> int:
    """Bits a layer's balance / low-rank tensors add to its stored size (counted in plan summaries and in the
    builder's weight budget)."""
    bits = BALANCE_BITS * info.shape[1] if flags.get(BALANCE) else 0
    for flag in (LOWRANK, ADAPTER):
        if flags.get(flag):
            bits += LOWRANK_BITS * int(flags[flag]["rank"]) * (info.in_features + info.shape[0])
    return bits
