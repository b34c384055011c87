"""The calibration on disk: one safetensors file (tensors, with the structure as JSON in its metadata; no pickle),
so a rerun with the same model, prompts and run settings skips the full-precision run."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .recording import Calibration, Recording

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
                       {k: float(v) for k, v in skeleton["elements"].items()}, from_cache=True)

