"""Build a plan the MixDQ way, as four stages, each a function with a typed result and its own cache:

1. **calibrate** (:func:`~.calibration.calibrate` -> :class:`~.recording.Calibration`): one full-precision run over
   the prompts, recording the denoiser's calls and outputs, the reference images, every layer's input range (token
   0 left out for BOS-aware layers) and the text encoder's BOS state when it is causal; cached on disk;
2. **measure** (:func:`~.measure.measure` -> :class:`~.measure.Sensitivities`): every layer at every candidate
   width, one layer quantized at a time: content layers by SSIM of the final images (or their MSE), quality layers
   by SQNR of the denoiser output, and activations alone when there is an activation decision; the rest of the
   model in full precision, or at the uniform base width (``context="uniform"``, :mod:`.uniform_context`); scores
   cached as measured;
3. **allocate** (:func:`~.assign.assign` -> :class:`~.assign.Assignment`): weight widths per group under the
   average-bits budget with a registered allocator (HiGHS by default, :mod:`.allocate`), sweeping the
   content/quality split ``k`` and keeping the candidate whose images are closest to full precision (per-image
   MSE, its mean, its worst tail or its mean in dB, on held-out pick prompts when given; with ``pick_uniform``
   the same-size uniform plan is a candidate too);
   activation widths under an element-weighted budget after keeping the most activation-sensitive inputs
   unquantized;
   **refine** (:func:`~.refine.refine`, on by default, off with ``refine_evaluations=0``): the picked widths
   improved by the measured image error of whole plans on the pick prompts, proposals from scores measured
   inside the plan;
4. **write** (:func:`~.write.write` -> :class:`~diffusers_mixdq.BitPlan`): the resolved plan with its provenance.
5. optional method stages (:func:`~.plan_stages.method_stages`, each off by default): channel balancing and low-rank
   branches fitted per layer on the calibration inputs (**correct**, :mod:`.correct`), adapters trained against the
   full-precision run (**distill**, :mod:`.distill`, MPQ-DM's relation distillation, simplified), static ranges per
   timestep group, int8 rows for the highest-kurtosis channels of int4 / int2 layers (budget reduced beforehand for
   the factors and rows they add).

:func:`build_plan` runs them in order; :func:`calibrated_plan` runs the first alone for a uniform plan. The report
counts denoiser sample-evaluations against the naive protocol (see :mod:`.measure` for what is saved).
"""

from __future__ import annotations

import time

from ..errors import MixDQError
from ..plan import BitPlan
from .assign import assign
from .calibration import calibrate
from .context import BuildContext
from .distributed import is_main_process, prepare
from .measure import measure
from .plan_stages import allocator_budget, method_stages
from .progress import quiet_pipeline
from .refine import enabled as refine_enabled
from .refine import refine, resolved
from .settings import BuildReport, BuildSettings
from .write import prompts_record, write

#: what ``diffusers_mixdq.builder.builder`` has always offered (``mixdq build`` imports is_main_process from here)
__all__ = ["BuildReport", "BuildSettings", "build_plan", "calibrate", "calibrated_plan", "is_main_process"]


def build_plan(pipe, settings: BuildSettings, progress: bool = True) -> tuple[BitPlan, BuildReport]:
    """Build a plan for ``pipe``'s denoiser (see the module docstring). Returns the plan and a report."""
    with quiet_pipeline(pipe):
        plan, report, _ = build_stages(pipe, settings, progress)
        return plan, report


def build_stages(pipe, settings: BuildSettings, progress: bool, others_for=None):
    """The stages of :func:`build_plan`; returns the plan, the report and the allocate stage's
    :class:`~.assign.Assignment`. ``others_for(ctx, calib)`` gives the layers of other components allocated with
    the denoiser's (:mod:`.plan_set`), after the denoiser's are measured."""
    settings.validate()
    settings = resolved(settings)
    state, denoiser = prepare(pipe, settings)
    if settings.cache_dir is None and state is not None:
        raise MixDQError("A sharded build (accelerate launch) needs a cache directory to merge the shards' scores.")
    ctx = BuildContext(pipe, denoiser, allocator_budget(settings, denoiser).for_model(denoiser), state, progress)
    report = ctx.report

    t0 = time.perf_counter()
    calib = calibrate(pipe, ctx.settings, progress=progress)
    report.seconds["calibrate"] = time.perf_counter() - t0
    rec = calib.recording
    if calib.from_cache:
        report.count("calibrate", 0, 0, reused=(rec.num_calls, rec.num_samples))
    else:
        report.count("calibrate", rec.num_calls, rec.num_samples)

    sens = measure(ctx, calib)
    others = others_for(ctx, calib) if others_for is not None else None
    chosen = assign(ctx, calib, sens, others)
    if refine_enabled(ctx):
        chosen = refine(ctx, calib, chosen)
    # the naive protocol calibrates, measures every candidate on everything, and picks (and refines) the same way
    picking = sum(report.sample_evaluations.get(p, 0) + report.reused_sample_evaluations.get(p, 0)
                  for p in ("pick", "pick_reference", "refine", "refine_context"))
    report.naive_sample_evaluations = rec.num_samples + sens.naive_samples + picking + getattr(others, "naive", 0)
    return method_stages(write(ctx, sens, chosen), denoiser, calib, ctx.settings, report), report, chosen


def calibrated_plan(pipe, plan: BitPlan, settings: BuildSettings, progress: bool = True) -> BitPlan:
    """``plan`` resolved against ``pipe``'s denoiser with calibrated static ranges and the BOS state attached
    (e.g. a uniform W8A8 plan: ``BitPlan.uniform("int8", activations="int8")`` has no ranges of its own)."""
    from ..bos import attach_bos

    _, denoiser = prepare(pipe, settings)
    with quiet_pipeline(pipe):
        calib = calibrate(pipe, settings, progress=progress)
    if calib.bos_state is not None:
        plan = attach_bos(plan, calib.bos_state)
    resolved = method_stages(plan.resolve(denoiser, act_ranges=calib.ranges), denoiser, calib, settings)
    resolved.provenance = {
        **resolved.provenance,  # the plan's, and what the method stages record
        "tool": "diffusers-mixdq calibrate",
        **prompts_record(settings),
        "steps": settings.steps,
        "guidance": settings.guidance,
    }
    return resolved
