"""Loading a pipeline (full precision or with a plan) and generating with fixed seeds: :class:`Generation` says how."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..families import DENOISER_COMPONENTS, denoiser_of


@dataclass(frozen=True)
class Generation:
    """How every variant generates: steps, guidance, size, batch size, the seed of prompt 0 (prompt ``i`` uses
    ``seed + i``) and extra keyword arguments of the pipeline call (e.g. a PixArt pipeline's
    ``use_resolution_binning=False``)."""

    steps: int = 8
    guidance: float = 4.0
    seed: int = 0
    batch_size: int = 16
    height: int | None = None
    width: int | None = None
    pipe_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "guidance": self.guidance, "seed": self.seed, "batch_size": self.batch_size,
                "height": self.height, "width": self.width, "pipe_kwargs": dict(self.pipe_kwargs)}


def denoiser_name(pipe) -> str:
    """Name of the pipeline component holding the denoiser (``unet`` or ``transformer``)."""
    return denoiser_of(pipe)[0]


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor in the module's state dict (quantized weights as stored), and of the buffers kept out
    of it (a plan's balancing and low-rank factors, which travel in the plan's sidecar)."""
    state = module.state_dict()
    saved = {t.data_ptr() for t in state.values()}  # a backend's buffers saved under other keys count once
    outside = [b for n, b in module.named_buffers() if n not in state and b.data_ptr() not in saved]
    return sum(t.numel() * t.element_size() for t in [*state.values(), *outside])


def load_pipeline(path: str | os.PathLike, plan=None, torch_dtype: torch.dtype = torch.float32):
    """The pipeline at ``path``, its denoiser quantized with ``plan`` (None: full precision), or each component
    with its own plan for a plan directory with component folders (``unet/``, ``text_encoder/``, ...) or a mapping
    ``{component: BitPlan}``."""
    from diffusers import DiffusionPipeline

    from ..bos import verify_text_encoder

    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if plan is not None:
        kwargs["quantization_config"] = _quantization_config(path, plan)
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if plan is not None:
        verify_text_encoder(pipe)
    return pipe


def _quantization_config(path, plan):
    from diffusers.quantizers import PipelineQuantizationConfig

    from ..config import MixDQConfig
    from ..errors import MixDQError
    from ..plan.components import component_plans

    index = json.loads((Path(path) / "model_index.json").read_text())
    plans = component_plans(plan, minimum=1)
    if not plans:
        plans = {next((c for c in DENOISER_COMPONENTS if c in index), DENOISER_COMPONENTS[-1]): plan}
    missing = sorted(set(plans) - set(index))
    if missing:
        raise MixDQError(f"The plan set has plans for {', '.join(missing)}, which the pipeline at {path} does not "
                         f"have (it has {', '.join(sorted(k for k in index if not k.startswith('_')))}).")
    return PipelineQuantizationConfig(quant_mapping={c: MixDQConfig(plan=p) for c, p in plans.items()})


def generate_timed(pipe, prompts: Sequence[str], seed: int, steps: int, guidance: float, batch_size: int = 16,
                   height: int | None = None, width: int | None = None, inference_mode: bool = True,
                   pipe_kwargs: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, list[float]]:
    """Images ``(N, 3, H, W)`` in [0, 1] (prompt ``i`` always uses seed ``seed + i``) and the seconds of each batch.
    ``inference_mode=False`` generates under ``no_grad`` instead (some peers' layers fail in inference mode)."""
    from ..sampling import generate as run

    seeds = [seed + i for i in range(len(prompts))]
    return run(pipe, prompts, seeds, steps, guidance, batch_size=batch_size, height=height, width=width,
               grad_mode="inference" if inference_mode else "no_grad", pipe_kwargs=pipe_kwargs)


def generate(pipe, prompts: Sequence[str], seed: int, steps: int, guidance: float, batch_size: int = 16,
             height: int | None = None, width: int | None = None,
             pipe_kwargs: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, float]:
    """Images ``(N, 3, H, W)`` in [0, 1] (prompt ``i`` always uses seed ``seed + i``) and the seconds per image
    (see :func:`~diffusers_mixdq.sampling.seconds_per_image`: the first batch is left out when there are several)."""
    from ..sampling import seconds_per_image

    images, times = generate_timed(pipe, prompts, seed, steps, guidance, batch_size, height, width,
                                   pipe_kwargs=pipe_kwargs)
    return images, seconds_per_image(times, len(prompts), batch_size)
