"""The timestep-groups stage (ViDiT-Q's timestep-aware ranges): each static activation range recorded again per
group of the sampler's timesteps, by replaying the calibration's recorded denoiser calls of each group.

The calibration run's distinct timesteps are split into ``n`` contiguous groups (as equal in count as they can be);
group ``i`` covers ``[t_lo, t_hi]`` from the midpoint below its smallest timestep to just under the midpoint
above its largest (the first from 0, the last to at least 1000), so every timestep the sampler can visit between
them falls in a group. A layer's groups go into its plan entry as ``act_groups`` beside its overall ``act_range``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..apply.timestep_groups import call_timestep
from ..plan import BitPlan
from .calibration import record_input_ranges
from .recording import Calibration, Recording

#: the last group reaches at least this timestep (diffusers schedulers train on 1000)
LAST_TIMESTEP = 1000.0
#: gap left between one group's t_hi and the next's t_lo (groups may not overlap)
GAP = 1e-3


def group_bounds(timesteps: list[float], n: int) -> list[tuple[float, float, list[float]]]:
    """``[(t_lo, t_hi, timesteps in the group), ...]`` for ``n`` contiguous groups of the distinct ``timesteps``."""
    distinct = sorted(set(timesteps))
    n = max(1, min(n, len(distinct)))
    chunks = [c.tolist() for c in torch.tensor(distinct, dtype=torch.float64).tensor_split(n)]
    lows = [0.0] + [(a[-1] + b[0]) / 2 for a, b in zip(chunks, chunks[1:])]
    highs = [lo - GAP for lo in lows[1:]] + [max(LAST_TIMESTEP, distinct[-1])]
    return [(lo, hi, chunk) for lo, hi, chunk in zip(lows, highs, chunks)]


def group_ranges(denoiser: nn.Module, rec: Recording, n: int, layers: list[str],
                 skip_first_token: list[str] = ()) -> list[tuple[float, float, dict[str, float]]]:
    """Per timestep group, each layer's input absmax over the recorded calls of that group."""
    times = [call_timestep(denoiser, args, kwargs) for args, kwargs in rec.calls]
    if any(t is None for t in times):
        raise ValueError("a recorded denoiser call has no timestep argument")
    values = [float(t) for t in times]
    out = []
    for lo, hi, _ in group_bounds(values, n):
        calls = [c for c, t in zip(rec.calls, values) if lo <= t <= hi]

        def run(calls=calls) -> None:
            for args, kwargs in calls:
                denoiser(*args, **kwargs)

        out.append((lo, hi, record_input_ranges(denoiser, run, layers, skip_first_token=skip_first_token)))
    return out


def add_timestep_groups(plan: BitPlan, groups: list[tuple[float, float, dict[str, float]]]) -> BitPlan:
    """``plan`` (resolved) with ``act_groups`` on every layer with a static range, from ``groups``."""
    layers: dict[str, dict[str, Any]] = {}
    for name, spec in plan.layers.items():
        r = spec.get("act_range")
        if spec.get("activations", "none") != "none" and isinstance(r, (int, float)):
            spec = {**spec, "act_groups": [[lo, hi, max(ranges.get(name, r), 1e-6)] for lo, hi, ranges in groups]}
        layers[name] = spec
    return with_layers(plan, layers)


def with_layers(plan: BitPlan, layers: dict[str, dict[str, Any]]) -> BitPlan:
    """``plan`` with its ``layers`` replaced (validated again; tensors kept)."""
    data = plan.to_dict()
    data["layers"] = layers
    new = BitPlan.from_dict(data)
    new.tensors = dict(plan.tensors)
    return new


def timestep_stage(plan: BitPlan, denoiser: nn.Module, calib: Calibration, n: int) -> BitPlan:
    """The stage: ``plan`` with ranges per timestep group (``n`` groups) recorded on ``calib``'s calls."""
    names = [name for name, spec in plan.layers.items() if isinstance(spec.get("act_range"), (int, float))
             and spec.get("activations", "none") != "none"]
    if n < 2 or not names:
        return plan
    return add_timestep_groups(plan, group_ranges(denoiser, calib.recording, n, names, calib.bos_layers))
