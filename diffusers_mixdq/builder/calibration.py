"""The calibrate stage: one full-precision run over the prompts, recording the denoiser's calls and outputs, the
images, every layer's input range (absolute max) and size, and the text encoder's BOS state when it is causal.

Its cache: ``calibration-<key>.safetensors`` in the build's cache directory (:mod:`.calibration_store`), keyed by
:func:`calibration_key`; a later build with the same model, prompts and run settings loads it instead of running.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import MixDQError
from ..plan import BitPlan, layer_table
from .calibration_store import load_calibration, save_calibration
from .distributed import distributed_state
from .recording import Calibration, Recording, record_run
from .settings import BuildSettings, run_pipeline

__all__ = ["Calibration", "calibrate", "calibration_key", "load_calibration", "record_input_ranges",
           "save_calibration"]


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



def calibration_key(denoiser: nn.Module, s: BuildSettings) -> str:
    """Identifies a full-precision calibration run: the model's structure and a sample of its weights, the prompts
    and the settings of the run."""
    from ..plan import fingerprint

    h = hashlib.sha256()
    h.update(fingerprint(layer_table(denoiser)).encode())
    for p in list(denoiser.parameters())[:4]:  # cheap guard against another checkpoint of the same architecture
        h.update(p.detach().float().flatten()[:256].cpu().numpy().tobytes())
    fields = [list(s.prompts), s.steps, s.guidance, s.height, s.width, s.seed, s.bos, str(next(denoiser.parameters()).dtype)]
    if s.pipe_kwargs:  # only when given, so the keys of existing caches stay what they were
        fields.append(dict(s.pipe_kwargs))
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def calibrate(pipe, settings: BuildSettings, progress: bool = False) -> Calibration:
    """One full-precision pipeline run over the prompts, recording the denoiser's calls, the images and every
    layer's input absmax and size (token 0 left out for the layers that will be BOS-aware).

    With ``settings.cache_dir`` the run is kept on disk (``calibration-<key>.safetensors``) and a later build with
    the same model, prompts and run settings loads it instead (``from_cache`` set); in a sharded build the main
    process calibrates and the others load its file. ``progress`` shows a bar, one step per denoiser call."""
    from ..families import denoiser_of

    _, denoiser = denoiser_of(pipe, settings.component)
    path = None
    if settings.cache_dir:
        path = Path(settings.cache_dir) / f"calibration-{calibration_key(denoiser, settings)}.safetensors"
    device = next(denoiser.parameters()).device
    state = distributed_state()
    if state is not None and path is not None:
        if state.is_main_process:
            calib = _calibrate_cached(pipe, settings, denoiser, path, device, progress)
        state.wait_for_everyone()
        if not state.is_main_process:
            calib = load_calibration(path, device) or _calibrate_now(pipe, settings, denoiser)
        return calib
    if path is not None:
        return _calibrate_cached(pipe, settings, denoiser, path, device, progress)
    return _calibrate_now(pipe, settings, denoiser, progress)


def _calibrate_cached(pipe, settings, denoiser, path: Path, device, progress: bool) -> Calibration:
    calib = load_calibration(path, device)
    if calib is None:
        calib = _calibrate_now(pipe, settings, denoiser, progress)
        save_calibration(calib, path)
    return calib


def _calibrate_now(pipe, settings: BuildSettings, denoiser: nn.Module, progress: bool = False) -> Calibration:
    from ..bos import NonCausalEncoderError, attach_bos, bos_hidden_state
    from .progress import calibration_bar

    bos_state = None
    if settings.bos:
        try:
            bos_state = bos_hidden_state(pipe)
        except (NonCausalEncoderError, MixDQError):
            bos_state = None
    template = BitPlan(defaults={"weights": "int8"})
    if bos_state is not None:
        template = attach_bos(template, bos_state)
    bos_layers = [n for n, sp in template.resolve(denoiser).layer_specs().items() if sp.flags.get("bos_aware")]
    holder: dict[str, Recording] = {}
    elements: dict[str, float] = {}

    # one batch of all prompts: a denoiser call per step (more for schedulers that call it twice a step)
    with calibration_bar(settings.steps, progress) as bar:

        def step() -> None:
            bar.total = max(bar.total, bar.n + 1)
            bar.update(1)

        def run():
            holder["rec"] = record_run(pipe, denoiser, lambda: run_pipeline(pipe, settings), on_call=step)

        ranges = record_input_ranges(denoiser, run, skip_first_token=bos_layers, elements=elements)
    return Calibration(holder["rec"], ranges, bos_state, bos_layers, elements)
