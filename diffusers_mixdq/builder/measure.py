"""The measure stage: every candidate layer's sensitivity at every candidate width (:mod:`.sensitivity` does one
layer at a time), the cheaper way.

A quality-layer measurement replays every recorded call on only ``sweep_fraction`` of its samples (a rotating
window, checked to be exact), a content-layer measurement generates ``content_fraction`` of the prompts (at least
:data:`MIN_CONTENT_PROMPTS`), a content layer's widest candidate is extrapolated from the next one (with ``measure_widths``, every
candidate width outside it is estimated from the measured ones instead: :mod:`.width_ladder`), a layer with
a single candidate is not measured, and activations are measured only when there is an activation decision.

Its cache: ``sensitivity-<key>.json`` (:class:`~.scores.ScoreCache`, keyed by :func:`sweep_key`), written after
every measurement, so an interrupted sweep resumes; in a sharded build each process writes its part file and the
parts are merged with accelerate's ``gather_object`` (:func:`~.scores.merged`).
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..plan import LayerSpec
from ..plan.spec import DYNAMIC_RANGES
from .calibration import calibration_key
from .context import BuildContext
from .published import file_records, seed_cache
from .recording import Calibration, Recording, subset_is_exact
from .scores import ScoreCache, merged
from .sensitivity import ContentScorer, SensitivityResult, layer_sensitivity
from .settings import BuildSettings, run_pipeline
from .uniform_context import base_width, complete, uniform_sensitivity
from .width_ladder import fill_estimates, measured_widths

#: content-layer measurements generate at least this many prompts (on the demo model, SSIM on 2 of 8 prompts chose
#: int2 layers that cost 11 dB of PSNR; 4 of 8 matched the naive protocol: benchmarks/builder_cost.py)
MIN_CONTENT_PROMPTS = 4
#: a content metric's value for images identical to full precision (SSIM 1, minus the MSE 0)
PERFECT = {"ssim": 1.0, "mse": 0.0}


@dataclass
class Sensitivities:
    """What the measure stage gives: weight scores, activation scores (``None`` without an activation decision)
    and what the naive protocol would have paid for the same sweeps (sample-evaluations)."""

    weights: SensitivityResult
    activations: SensitivityResult | None
    naive_samples: int


def prompt_subset(n: int, fraction: float, minimum: int = 1) -> list[int]:
    """``max(minimum, round(fraction * n))`` prompt indices (all when there are fewer) spread evenly over ``0..n-1``."""
    k = min(n, max(minimum, 1, round(fraction * n)))
    return [i * n // k for i in range(k)]


def sweep_key(denoiser: nn.Module, s: BuildSettings) -> str:
    """Identifies a sensitivity sweep: the calibration and what changes a score (the groups' metrics, the share of
    samples measured). A cache file is reused only for the same key; candidate widths may change freely."""
    h = hashlib.sha256(calibration_key(denoiser, s).encode())
    h.update(json.dumps([list(s.content_patterns), s.sweep_fraction, s.content_fraction]).encode())
    if s.content_metric != "ssim":  # SSIM keys unchanged
        h.update(json.dumps(["content_metric", s.content_metric]).encode())
    if s.context != "fp":  # scores in the uniform model depend on its width and activations (fp keys unchanged)
        h.update(json.dumps([s.context, base_width(s.widths, s.weight_bits), s.activations,
                             max(s.act_widths)]).encode())
    if s.sensitivity_files:  # a cache seeded from files is only reused with the same files
        h.update(json.dumps(file_records(s.sensitivity_files)).encode())
    return h.hexdigest()[:16]


def extrapolate_ssim(score: float, bits: int, wider: int, perfect: float = 1.0) -> float:
    """SSIM at ``wider`` bits from SSIM at ``bits``: quantization noise power falls 4x per extra bit, and for small
    noise the SSIM loss is proportional to it, so ``1 - s_wider = (1 - s_bits) / 4**(wider - bits)`` (an 8-bit
    layer keeps 1/256 of its 4-bit loss: whatever its true value, it can hardly change the allocation). The same
    for minus the image MSE (``perfect=0``), which is proportional to the noise power."""
    return perfect - (perfect - score) / 4 ** (wider - bits)


def sweep_widths(s: BuildSettings) -> tuple[dict[str, list[int]], dict[str, tuple[int, int]]]:
    """The widths to measure per group (none for a single candidate) and, per group, ``(widest, from)`` when the
    widest is extrapolated instead (content layers, scored by SSIM)."""
    widths = {g: sorted(set(ws)) if len(set(ws)) > 1 else [] for g, ws in s.widths.items()}
    extrapolated = {}
    if s.measure_widths is not None:  # the others are estimated afterwards (:mod:`.width_ladder`)
        return measured_widths(widths, s.measure_widths), extrapolated
    if s.extrapolate_widest and len(widths.get("content", [])) > 1:
        *rest, widest = widths["content"]
        extrapolated = {"content": (widest, rest[-1])}
        widths["content"] = rest
    return widths, extrapolated


def _quality_recording(ctx: BuildContext, rec: Recording) -> Recording:
    """The recorded calls on ``sweep_fraction`` of their samples, when replaying them so is exact."""
    sub = rec.subset(ctx.settings.sweep_fraction)
    if sub is rec:
        return rec
    ctx.report.count("subset_check", sub.num_calls, sub.num_samples)
    if subset_is_exact(ctx.denoiser, sub):
        return sub
    warnings.warn(f"{type(ctx.denoiser).__name__} does not compute its samples independently; measuring on "
                  "every recorded sample (sweep_fraction ignored for quality layers).", stacklevel=3)
    return rec


def content_scorer(ctx: BuildContext, rec: Recording) -> ContentScorer:
    """SSIM (or minus the mean per-image MSE, ``content_metric="mse"``) of the images of a share of the prompts
    against full precision."""
    s = ctx.settings
    prompts = prompt_subset(len(s.prompts), s.content_fraction, MIN_CONTENT_PROMPTS)

    def score() -> float:
        from torchmetrics.functional.image import structural_similarity_index_measure

        with torch.no_grad():
            images = run_pipeline(ctx.pipe, s, prompts)
        if s.content_metric == "mse":
            return -float((images.double() - rec.images[prompts].double()).pow(2).flatten(1).mean(1).mean())
        return float(structural_similarity_index_measure(images, rec.images[prompts], data_range=1.0))

    return ContentScorer(score, (rec.num_calls, rec.num_samples * len(prompts) // len(s.prompts)),
                         metric=s.content_metric)


def _score_cache(ctx: BuildContext) -> ScoreCache:
    """The sweep's cache file (``None`` path: in memory only); in a sharded build, this process's part of it."""
    s = ctx.settings
    return ctx.score_cache(Path(s.cache_dir) / f"sensitivity-{sweep_key(ctx.denoiser, s)}.json"
                           if s.cache_dir else None)


def _activation_spec(s: BuildSettings, calib: Calibration):
    bos_layers = set(calib.bos_layers)

    def spec(name: str, bits: int) -> LayerSpec:
        act_range = s.activations if s.activations in DYNAMIC_RANGES else max(calib.ranges.get(name, 1.0), 1e-6)
        return LayerSpec("none", f"int{bits}", act_range, {"bos_aware": True} if name in bos_layers else {})

    return spec


def measure(ctx: BuildContext, calib: Calibration) -> Sensitivities:
    """Score every candidate layer (weights, and activations when there is a decision to make); see the module
    docstring. Records times and costs in ``ctx.report``."""
    s, rec, report = ctx.settings, calib.recording, ctx.report
    t0 = time.perf_counter()
    cache = _score_cache(ctx)
    common = dict(quality_rec=_quality_recording(ctx, rec), content=content_scorer(ctx, rec),
                  naive_cost=(rec.num_calls, rec.num_samples), bos_state=calib.bos_state, progress=ctx.progress,
                  cache=cache, shard=ctx.shard)
    widths, extrapolated = sweep_widths(s)
    if s.sensitivity_files:  # scores measured elsewhere: nothing is extrapolated over them
        seed_cache(cache, s.sensitivity_files, ctx.candidates)
        widths, extrapolated = {g: list(w) for g, w in s.widths.items()}, {}
    if s.context == "uniform":
        sens, extrapolated = uniform_sensitivity(ctx, calib, common), {}
    else:
        sens = layer_sensitivity(ctx.denoiser, ctx.candidates, widths, ctx.groups,
                                 lambda n, b: LayerSpec(f"int{b}"), kind="weights", **common)
    act_sens = None
    if s.activation_sweep:
        t_act = time.perf_counter()
        act_sens = layer_sensitivity(ctx.denoiser, ctx.candidates, {g: list(s.act_widths) for g in ("content", "quality")},
                                     ctx.groups, _activation_spec(s, calib), kind="activations", **common)
        report.seconds["activation_sensitivity"] = time.perf_counter() - t_act
    if ctx.state is not None:  # every process takes the others' scores
        every = merged(cache)
        for result in (sens, act_sens):
            if result is not None:
                result.fill_from(every)
        report.denoiser_evaluations["shards"] = ctx.state.num_processes
    if s.context == "uniform":
        complete(ctx, sens, every if ctx.state is not None else cache)
    for name in ctx.candidates:  # after the shards' scores are merged
        if ctx.groups[name] in extrapolated:
            widest, below = extrapolated[ctx.groups[name]]
            sens.scores[name][widest] = extrapolate_ssim(sens.scores[name][below], below, widest,
                                                         PERFECT[s.content_metric])
    if s.measure_widths is not None:
        fill_estimates(sens.scores, s.widths, ctx.groups, sens.metric)
    report.seconds["sensitivity"] = time.perf_counter() - t0 - report.seconds.get("activation_sensitivity", 0.0)
    return _account(ctx, rec, sens, act_sens)


def _account(ctx: BuildContext, rec: Recording, sens: SensitivityResult, act_sens) -> Sensitivities:
    """Costs into the report; the naive protocol measures every candidate width of every layer, on every sample and
    every prompt."""
    ctx.report.count("sensitivity", sens.cost.calls, sens.cost.samples,
                     reused=(sens.reused.calls, sens.reused.samples))
    naive = rec.num_samples * sum(len(set(ctx.settings.widths[ctx.groups[n]])) for n in ctx.candidates)
    if act_sens is not None:
        ctx.report.count("activation_sensitivity", act_sens.cost.calls, act_sens.cost.samples,
                         reused=(act_sens.reused.calls, act_sens.reused.samples))
        naive += act_sens.naive.samples
    return Sensitivities(sens, act_sens, naive)
