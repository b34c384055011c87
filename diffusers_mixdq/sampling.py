"""One way to run a pipeline over prompts with fixed seeds, shared by evaluation and the plan builder.

Each prompt has its own generator seeded from ``seeds``, so an image never depends on the batch it was made in:
the same prompt and seed give the same image in a build, in ``mixdq eval`` and in a benchmark.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Mapping, Sequence

import torch

#: how the pipeline call is wrapped: ``"inference"`` (torch.inference_mode), ``"no_grad"``, or ``None`` (as is;
#: diffusers pipelines already run under no_grad, and recorded tensors stay usable outside inference mode)
GradMode = str | None


def _grad_context(mode: GradMode):
    if mode == "inference":
        return torch.inference_mode()
    if mode == "no_grad":
        return torch.no_grad()
    return contextlib.nullcontext()


def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    *,
    batch_size: int | None = None,
    height: int | None = None,
    width: int | None = None,
    grad_mode: GradMode = "inference",
    pipe_kwargs: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Images ``(N, 3, H, W)`` in [0, 1] on the CPU (prompt ``i`` generated with seed ``seeds[i]``) and the
    wall-clock seconds of each batch. ``batch_size=None`` runs all prompts in one batch; ``pipe_kwargs`` are passed
    to every pipeline call (e.g. a DiT pipeline's ``use_resolution_binning=False``)."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    size = batch_size or max(len(prompts), 1)
    images, times = [], []
    for start in range(0, len(prompts), size):
        chunk = list(prompts[start : start + size])
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + size]]
        t0 = time.perf_counter()
        with _grad_context(grad_mode):
            out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt",
                       height=height, width=width, **dict(pipe_kwargs or {})).images
        times.append(time.perf_counter() - t0)
        images.append(out.float().cpu())
    return torch.cat(images), times


def seconds_per_image(batch_seconds: Sequence[float], num_images: int, batch_size: int | None = None) -> float:
    """Wall-clock seconds per image of a :func:`generate` run that took ``batch_seconds`` for ``num_images`` images
    in batches of ``batch_size`` (None: one batch). With several batches the first one, which includes one-time
    set-up (kernel selection, lazy weight loading), is left out."""
    size = batch_size or max(num_images, 1)
    sizes = [min(size, num_images - start) for start in range(0, num_images, size)]
    if len(sizes) != len(batch_seconds):
        raise ValueError(f"{len(batch_seconds)} batch times for {len(sizes)} batches")
    if len(sizes) > 1:
        sizes, batch_seconds = sizes[1:], list(batch_seconds)[1:]
    return float(sum(batch_seconds)) / max(sum(sizes), 1)
