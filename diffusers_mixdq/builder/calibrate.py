"""Calibration: record the input range (absolute max) of every quantizable layer while the model runs, and keep
a full-precision run on disk (:func:`save_calibration` / :func:`load_calibration`) so a rerun skips it."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..plan import layer_table
from .sensitivity import Recording


def record_input_ranges(
    model: nn.Module,
    run: Callable[[], Any],
    layers: Iterable[str] | None = None,
    skip_first_token: Iterable[str] = (),
    momentum: float | None = None,
    elements: dict[str, float] | None = None,
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
            if elements is not None and x.dim() >= 1 and x.shape[0] > 0:
                elements[name] = max(elements.get(name, 0.0), x.numel() / x.shape[0])
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


@dataclass
class Calibration:
    """The full-precision run: recorded denoiser calls and images, input ranges and sizes, BOS state and layers."""

    recording: Recording
    ranges: dict[str, float]
    bos_state: torch.Tensor | None
    bos_layers: list[str]
    elements: dict[str, float] = field(default_factory=dict)


_FORMAT = "diffusers-mixdq-calibration/1"


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("dict keys must be strings")
        return {"__dict__": {k: _encode(v, tensors) for k, v in value.items()}}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, torch.Tensor], device: torch.device | str) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]].to(device)
        if "__tuple__" in value:
            return tuple(_decode(v, tensors, device) for v in value["__tuple__"])
        return {k: _decode(v, tensors, device) for k, v in value["__dict__"].items()}
    if isinstance(value, list):
        return [_decode(v, tensors, device) for v in value]
    return value


def save_calibration(calib: Calibration, path: str | os.PathLike) -> bool:
    """Write ``calib`` to one safetensors file (tensors, with the structure as JSON in its metadata; no pickle).
    Returns ``False`` (and writes nothing) when the recorded calls hold something that is not data."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    rec = calib.recording
    try:
        skeleton = {
            "calls": _encode([[list(a), k] for a, k in rec.calls], tensors),
            "outputs": _encode(rec.outputs, tensors),
            "images": _encode(rec.images, tensors),
            "bos_state": _encode(calib.bos_state, tensors),
            "ranges": calib.ranges,
            "elements": calib.elements,
            "bos_layers": calib.bos_layers,
        }
    except TypeError as e:
        warnings.warn(f"calibration not cached: a denoiser argument is not data ({e})", stacklevel=2)
        return False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": _FORMAT, "skeleton": json.dumps(skeleton)})
    os.replace(tmp, path)
    return True


def load_calibration(path: str | os.PathLike, device: torch.device | str = "cpu") -> Calibration | None:
    """The calibration saved at ``path`` (``None`` when there is none, or it is unreadable / another format)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            return None
        skeleton = json.loads(meta["skeleton"])
        tensors = load_file(str(path))
    except Exception as e:  # a torn or foreign file is recomputed, never trusted
        warnings.warn(f"ignoring unreadable calibration cache {path}: {e}", stacklevel=2)
        return None
    calls = [(tuple(a), k) for a, k in _decode(skeleton["calls"], tensors, device)]
    rec = Recording(calls=calls, outputs=_decode(skeleton["outputs"], tensors, device),
                    images=_decode(skeleton["images"], tensors, "cpu"))
    return Calibration(rec, {k: float(v) for k, v in skeleton["ranges"].items()},
                       _decode(skeleton["bos_state"], tensors, device), list(skeleton["bos_layers"]),
                       {k: float(v) for k, v in skeleton["elements"].items()})
