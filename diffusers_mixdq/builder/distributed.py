"""Sharded builds: accelerate's process state, where each process runs, which process writes."""

from __future__ import annotations

import os

import torch

from ..families import denoiser_of
from .settings import BuildSettings


def distributed_state():
    """accelerate's process state when running sharded (more than one process), e.g. under
    ``accelerate launch --multi_gpu --num_processes 2 $(which mixdq) build RECIPE`` or ``torchrun``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    # on a machine without CUDA, accelerate only forms a process group when asked for CPU (gloo)
    state = PartialState(cpu=not torch.cuda.is_available())
    return state if state.num_processes > 1 else None


def build_device(settings: BuildSettings, state=None) -> torch.device | None:
    """Where the build runs: in a sharded build on a CUDA machine, each process's own GPU (``state.device``, which
    accelerate sets from ``LOCAL_RANK``); else ``settings.device``; ``None`` leaves the pipeline where it is."""
    if state is not None and torch.cuda.is_available() and state.device.type == "cuda":
        return state.device
    return torch.device(settings.device) if settings.device else None


def prepare(pipe, settings: BuildSettings):
    """The process state of a sharded build (or ``None``) and the denoiser, with the pipeline on its device."""
    state = distributed_state()
    device = build_device(settings, state)
    if device is not None:
        pipe.to(device)
    return state, denoiser_of(pipe, settings.component)[1]


def is_main_process() -> bool:
    state = distributed_state()
    return state is None or state.is_main_process
