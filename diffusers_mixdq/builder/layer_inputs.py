"""Per-layer calibration inputs for the correct stage: each layer's per-input-channel absolute max over every recorded
denoiser call, and a bounded sample of its inputs to measure the layer's output error on.

Both come from one full-precision replay of the calibration recording (:func:`~.recording.replay`), with a forward
pre-hook per layer. Token 0 of BOS-aware layers is left out, as it is for their activation ranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .recording import Recording, replay

#: rows (Linear) a layer keeps for its error measurements, and feature maps (Conv2d)
MAX_ROWS = 2048
MAX_MAPS = 8


@dataclass
class LayerInputs:
    """``absmax``: per input channel over all calls; ``samples``: rows ``(N, C)`` (Linear) or maps ``(N, C, H, W)``."""

    absmax: torch.Tensor
    samples: torch.Tensor


def _kept_calls(num_calls: int, count: int) -> set[int]:
    if num_calls <= count:
        return set(range(num_calls))
    return {round(i * (num_calls - 1) / (count - 1)) for i in range(count)} if count > 1 else {0}


class _Collector:
    """The pre-hook state of one layer."""

    def __init__(self, conv: bool, skip_first: bool, per_call: int):
        self.conv, self.skip_first, self.per_call = conv, skip_first, per_call
        self.absmax: torch.Tensor | None = None
        self.kept: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, keep: bool) -> None:
        x = x.detach().float()
        if self.skip_first and x.dim() == 3:
            x = x[:, 1:]
        if x.numel() == 0:
            return
        flat = x.transpose(0, 1).reshape(x.shape[1], -1) if self.conv else x.reshape(-1, x.shape[-1]).T
        m = flat.abs().amax(dim=1)
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        if keep:
            if self.conv:
                self.kept.append(x[: self.per_call].clone())
            else:
                rows = x.reshape(-1, x.shape[-1])
                step = max(1, rows.shape[0] // self.per_call)
                self.kept.append(rows[::step][: self.per_call].clone())

    def result(self) -> LayerInputs | None:
        if self.absmax is None:
            return None
        return LayerInputs(self.absmax, torch.cat(self.kept) if self.kept else torch.empty(0))


def capture_inputs(denoiser: nn.Module, rec: Recording, layers: Iterable[str],
                   skip_first_token: Iterable[str] = (), max_rows: int = MAX_ROWS,
                   max_maps: int = MAX_MAPS) -> dict[str, LayerInputs]:
    """Per-channel absmax and a sample of inputs of ``layers`` over one replay of ``rec`` (see the module doc)."""
    names = list(layers)
    skip = set(skip_first_token)
    kept_calls = _kept_calls(rec.num_calls, max_maps)
    collectors: dict[str, _Collector] = {}
    state = {"call": -1}
    handles = []
    for name in names:
        module = denoiser.get_submodule(name)
        conv = isinstance(module, nn.Conv2d)
        per_call = 1 if conv else max(1, max_rows // max(len(kept_calls), 1))
        collectors[name] = _Collector(conv, name in skip, per_call)

        def hook(mod, args, _c=collectors[name]):
            _c.add(args[0], state["call"] in kept_calls)

        handles.append(module.register_forward_pre_hook(hook))

    def count_call(mod, args, kwargs):
        state["call"] += 1

    handles.append(denoiser.register_forward_pre_hook(count_call, with_kwargs=True))
    try:
        replay(denoiser, rec)
    finally:
        for h in handles:
            h.remove()
    return {n: r for n, c in collectors.items() if (r := c.result()) is not None}
