"""Timestep-aware static activation ranges (ViDiT-Q; MPQ-DM uses per-step scales): a layer whose plan entry has
``act_groups`` quantizes its input with the scale of the timestep group the current denoiser call belongs to.

* Each such module holds two buffers, saved with pre-quantized checkpoints: ``act_group_bounds`` (``(G, 2)``
  float32 ``[t_lo, t_hi]``) and ``act_group_scales`` (``(G,)``, the model's float dtype).
* One :class:`TimestepClock` per model holds the current timestep as a 0-dim tensor. A forward pre-hook on the
  denoiser (:func:`install_clock`) sets it from the call's ``timestep`` argument and a forward hook clears it.
* A module picks its scale with tensor ops only (:func:`group_scale`): no host sync per layer, no Python branch on
  the timestep's value. A call outside every group, or a module called outside a denoiser call, uses the layer's
  ``act_range`` (``input_scale``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..plan import LayerSpec
from .activations import activation_scale

#: buffers of a module with timestep groups (made from the plan; saved with pre-quantized checkpoints)
GROUP_BUFFERS = ("act_group_bounds", "act_group_scales")
#: the attribute holding a model's clock (on the denoiser and on each grouped module)
CLOCK_ATTR = "_mixdq_timestep_clock"


class TimestepClock:
    """The timestep of the denoiser call in progress (``None`` outside one)."""

    def __init__(self) -> None:
        self.t: torch.Tensor | None = None


def configure_groups(module: nn.Module, spec: LayerSpec, scale_dtype: torch.dtype) -> None:
    """Give ``module`` the group buffers of ``spec`` (nothing when ``spec`` has no ``act_groups``)."""
    if not spec.act_groups:
        return
    bounds = torch.tensor([[lo, hi] for lo, hi, _ in spec.act_groups], dtype=torch.float32)
    scales = torch.tensor([activation_scale(spec.activations, r) for _, _, r in spec.act_groups], dtype=scale_dtype)
    module.register_buffer("act_group_bounds", bounds)
    module.register_buffer("act_group_scales", scales)
    setattr(module, CLOCK_ATTR, None)


def has_groups(module: nn.Module) -> bool:
    return getattr(module, "act_group_scales", None) is not None


def group_scale(module: nn.Module) -> torch.Tensor:
    """The input scale of ``module`` for the current timestep (``input_scale`` outside every group)."""
    clock = getattr(module, CLOCK_ATTR, None)
    if clock is None or clock.t is None:
        return module.input_scale
    bounds = module.act_group_bounds
    t = clock.t.to(bounds.device)
    inside = (t >= bounds[:, 0]) & (t <= bounds[:, 1])
    index = inside.to(torch.int8).argmax().reshape(1)
    scales = module.act_group_scales
    picked = scales.index_select(0, index).reshape(())  # a tensor op: no .item(), no graph break
    return torch.where(inside.any(), picked, module.input_scale.to(scales.dtype))


def _timestep_position(model: nn.Module) -> int | None:
    """Position of ``timestep`` among the positional arguments of ``model.forward`` (``None``: keyword only)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names.index("timestep") if "timestep" in names else None


def call_timestep(model: nn.Module, args: tuple, kwargs: dict, position: int | None = -1) -> torch.Tensor | None:
    """The timestep of a call ``model(*args, **kwargs)`` as a 0-dim float tensor (its first element; ``None`` when
    the call has none). ``position``: where ``timestep`` sits among the positional arguments (``-1``: look it up)."""
    position = _timestep_position(model) if position == -1 else position
    value = kwargs.get("timestep")
    if value is None and position is not None and len(args) > position:
        value = args[position]
    return _as_time(value)


def _as_time(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(-1)[0].float() if value.numel() else None
    if isinstance(value, (int, float)):
        return torch.tensor(float(value))
    return None


class _ClockHook:
    """Sets and clears a clock around each denoiser call (an object, not a closure, so that a deep copy of the
    model gets hooks that drive the copy's clock)."""

    def __init__(self, clock: TimestepClock, position: int | None):
        self.clock, self.position = clock, position

    def start(self, module, args, kwargs):
        self.clock.t = call_timestep(module, args, kwargs, self.position)

    def stop(self, module, args, kwargs, output):
        self.clock.t = None


def install_clock(model: nn.Module) -> TimestepClock | None:
    """Share one clock among ``model``'s modules with timestep groups, set from each call's ``timestep``
    (the first element: every sample of a denoiser call is at the same step). ``None`` when no module has groups.
    Installing again replaces the earlier clock and hooks."""
    grouped = [m for m in model.modules() if has_groups(m)]
    if not grouped:
        return None
    for handle in getattr(model, "_mixdq_clock_handles", ()):
        handle.remove()
    clock = TimestepClock()
    hook = _ClockHook(clock, _timestep_position(model))
    model._mixdq_clock_handles = (model.register_forward_pre_hook(hook.start, with_kwargs=True),
                                  model.register_forward_hook(hook.stop, with_kwargs=True, always_call=True))
    for m in grouped:
        setattr(m, CLOCK_ATTR, clock)
    setattr(model, CLOCK_ATTR, clock)
    return clock
