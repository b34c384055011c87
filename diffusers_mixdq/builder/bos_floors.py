"""BOS-safe text-encoder widths (issue #16): how far quantized text encoders move the BOS state the denoiser's
BOS rows were computed for, and the narrowest width each text-encoder layer may take so that it stays close.

Why it matters (:mod:`.text_encoders`, docs/plan-format.md "Building a plan set"): a BOS-aware denoiser layer serves
token 0 from its full-precision row only while input row 0 is within ``BOS_MATCH_TOLERANCE`` of the recorded
state. :func:`bos_safe_widths` first measures how much raising each layer by one width lowers the drift of the
encoder at its narrowest widths, per bit added, then raises layers in that order, measuring the drift after each,
until it is within :data:`BOS_MARGIN` of the tolerance (again while a layer can still be raised). That is about
two drift measurements per layer (a drift measurement: the probe prompts through the text encoders, with the
layers swapped for quantized copies made once per width). In a causal encoder token 0 attends only to itself,
so its query and key projections cannot move the state: they gain nothing and are never raised.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack, contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from ..plan import BOS_MATCH_TOLERANCE, BitPlan, LayerSpec
from .sensitivity import swapped
from .text_encoders import TextEncoderPart, applied_plans

#: the narrowest allowed widths keep the BOS state within this share of BOS_MATCH_TOLERANCE (room for float16)
BOS_MARGIN = 0.5

Key = tuple[str, str]  # (component, layer)


def relative_drift(pipe, state: torch.Tensor) -> float:
    """How far the pipeline's BOS state (as its text encoders are now) is from ``state`` (relative norm)."""
    from ..bos import bos_hidden_state

    state = state.float().cpu().reshape(-1)
    return float((bos_hidden_state(pipe).reshape(-1) - state).norm() / state.norm().clamp_min(1e-12))


def bos_drift(pipe, parts: Sequence[TextEncoderPart], plans: Mapping[str, BitPlan], state: torch.Tensor) -> float:
    """The BOS drift with the text encoders quantized per ``plans``."""
    with applied_plans(parts, plans):
        return relative_drift(pipe, state)


class _Copies:
    """Quantized copies of text-encoder layers, made once per width, swapped in for a drift measurement."""

    def __init__(self, pipe, parts: Sequence[TextEncoderPart], state: torch.Tensor):
        self.pipe, self.state = pipe, state
        self.modules = {p.component: p.module for p in parts}
        self.copies: dict[tuple[str, str, int], torch.nn.Module] = {}

    @contextmanager
    def _at(self, floor: Mapping[Key, int]) -> Iterator[None]:
        from ..apply import quantize_module

        with ExitStack() as stack:
            for (component, name), width in floor.items():
                module = self.modules[component]
                if (component, name, width) not in self.copies:
                    self.copies[(component, name, width)] = quantize_module(module.get_submodule(name),
                                                                            LayerSpec(f"int{width}"))
                stack.enter_context(swapped(module, name, self.copies[(component, name, width)]))
            yield

    def drift(self, floor: Mapping[Key, int]) -> float:
        with self._at(floor):
            return relative_drift(self.pipe, self.state)


def bos_safe_widths(pipe, parts: Sequence[TextEncoderPart], widths: Sequence[int],
                    state: torch.Tensor | None) -> list[str]:
    """Set each part's allowed widths: the candidate ``widths``, less those below a layer's BOS-safe floor (see the
    module docstring; no floor without a BOS state). Returns the raised layers (``component/layer``), in order."""
    widths = sorted(set(widths))
    floor: dict[Key, int] = {(p.component, n): widths[0] for p in parts for n in p.table}
    raised: list[str] = []
    if state is not None:
        copies = _Copies(pipe, parts, state)
        current = copies.drift(floor)
        numel = {(p.component, n): info.numel for p in parts for n, info in p.table.items()}
        while current > BOS_MARGIN * BOS_MATCH_TOLERANCE:
            order = _gains(copies, floor, current, widths, numel)
            if not order:  # nothing left that lowers it
                _warn(current)
                break
            for key in order:
                floor[key] = widths[widths.index(floor[key]) + 1]
                current = copies.drift(floor)
                raised.append(f"{key[0]}/{key[1]}")
                if current <= BOS_MARGIN * BOS_MATCH_TOLERANCE:
                    break
    for p in parts:
        p.widths = {n: [w for w in widths if w >= floor[(p.component, n)]] for n in p.table}
    return raised


def _gains(copies: _Copies, floor: dict[Key, int], current: float, widths: list[int],
           numel: Mapping[Key, int]) -> list[Key]:
    """The layers that can be raised one width and lower the drift by it, best drift reduction per bit first."""
    gains = {}
    for key, width in floor.items():
        if width < widths[-1]:
            wider = widths[widths.index(width) + 1]
            gain = (current - copies.drift({**floor, key: wider})) / (numel[key] * (wider - width))
            if gain > 0:
                gains[key] = gain
    return sorted(gains, key=lambda k: (-gains[k], k))


def _warn(current: float) -> None:
    if current > BOS_MATCH_TOLERANCE:
        warnings.warn(f"The text encoders at their widest useful widths move the BOS state by {current:.1%} "
                      f"(tolerance {BOS_MATCH_TOLERANCE:.0%}): the denoiser's BOS rows will take the quantized path.",
                      stacklevel=3)
