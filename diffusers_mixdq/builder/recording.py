"""What the full-precision run records: the denoiser's calls and outputs and the images (:class:`Recording`), and
with the layers' input ranges and the BOS state, the whole calibration (:class:`Calibration`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Recording:
    """What one full-precision pipeline run recorded: the denoiser's calls and outputs, and the images."""

    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    images: torch.Tensor | None = None

    @property
    def num_calls(self) -> int:
        return len(self.calls)

    @property
    def num_samples(self) -> int:
        """Denoiser sample-evaluations one replay costs: every call's batch size, summed (CFG counts twice)."""
        return sum(int(o.shape[0]) for o in self.outputs)

    def subset(self, fraction: float) -> Recording:
        """The same calls on about ``fraction`` of each call's samples. Call ``i`` keeps a window of
        ``max(1, round(fraction * batch))`` samples starting at ``i * window`` (wrapping), so that over the calls
        every sample (prompt, and CFG half) is covered at some timestep. Denoisers compute every sample on its
        own, so a sliced call gives exactly the sliced output (:func:`subset_is_exact` checks it)."""
        if fraction >= 1:
            return self
        sub = Recording(images=self.images)
        for i, ((args, kwargs), out) in enumerate(zip(self.calls, self.outputs)):
            batch = int(out.shape[0])
            take = max(1, round(fraction * batch))
            index = torch.tensor([(i * take + m) % batch for m in range(take)], device=out.device)
            sub.calls.append((_take(args, batch, index), _take(kwargs, batch, index)))
            sub.outputs.append(out.index_select(0, index))
        return sub


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` (tensors, possibly nested in dicts, lists and tuples) with ``fn`` applied to every tensor."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def _take(value: Any, batch: int, index: torch.Tensor) -> Any:
    """``value`` with every tensor whose first dimension is the batch reduced to the samples in ``index``."""
    return map_tensors(
        value, lambda t: t.index_select(0, index.to(t.device)) if t.dim() >= 1 and t.shape[0] == batch else t
    )


def subset_is_exact(denoiser: nn.Module, sub: Recording, atol: float = 1e-4) -> bool:
    """Whether replaying the sliced calls of ``sub`` in full precision reproduces the recorded outputs (it does for
    diffusers' UNets and DiTs; a denoiser mixing samples, or an argument sliced by mistake, would not)."""
    for out, ref in zip(replay(denoiser, sub), sub.outputs):
        if out.shape != ref.shape or not torch.allclose(out.float(), ref.float(), atol=atol, rtol=1e-3):
            return False
    return True


def _detach(value: Any) -> Any:
    return map_tensors(value, lambda t: t.detach().clone())


def first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    return output[0]


def record_run(pipe, denoiser: nn.Module, run: Callable[[], torch.Tensor],
               on_call: Callable[[], Any] | None = None) -> Recording:
    """Run ``run()`` (a full-precision pipeline call returning images) and record every denoiser call (calling
    ``on_call()`` after each, e.g. to advance a progress bar)."""
    rec = Recording()

    def hook(module, args, kwargs, output):
        rec.calls.append((_detach(args), _detach(kwargs)))
        rec.outputs.append(first_tensor(output).detach().clone())
        if on_call is not None:
            on_call()

    handle = denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            rec.images = run()
    finally:
        handle.remove()
    return rec



def replay(denoiser: nn.Module, rec: Recording) -> list[torch.Tensor]:
    """The denoiser's outputs on the recorded calls."""
    with torch.no_grad():
        return [first_tensor(denoiser(*args, **kwargs)) for args, kwargs in rec.calls]



@dataclass
class Calibration:
    """The full-precision run: recorded denoiser calls and images, input ranges and sizes, BOS state and layers."""

    recording: Recording
    ranges: dict[str, float]
    bos_state: torch.Tensor | None
    bos_layers: list[str]
    elements: dict[str, float] = field(default_factory=dict)
    #: loaded from the build's cache instead of run (set by :func:`~.calibration.calibrate`)
    from_cache: bool = False

