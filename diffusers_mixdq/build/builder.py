"""Build a plan the MixDQ way: calibrate → metric-decoupled sensitivity → integer programming → plan.

This is the library core of the recipe builder. Given a loaded pipeline and prompts it:

1. runs the pipeline once in full precision, recording the denoiser's calls and outputs, the reference images,
   and every layer's input range (token 0 left out for BOS-aware layers);
2. finds the text encoder's BOS hidden state when the encoder is causal (BOS-aware K/V layers);
3. scores every layer at every candidate weight width, one layer quantized at a time: content layers by SSIM of
   the final images, quality layers by SQNR of the denoiser output (:mod:`.sensitivity`);
4. allocates widths with HiGHS per group under the average-bits budget, sweeping the content/quality split
   ``k`` (:mod:`.allocate`), and keeps the candidate whose images are closest (MSE) to full precision;
5. returns a resolved :class:`~diffusers_mixdq.BitPlan` with ranges, the BOS state and provenance.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import MixDQError
from ..plan.format import BitPlan
from ..plan.layers import layer_table
from .allocate import AllocationProblem, FixedLayer, LayerChoice, pick, sweep
from .calibrate import record_input_ranges
from .sensitivity import CONTENT_PATTERNS, Recording, ScoreCache, layer_group, record_run, weight_sensitivity

BITS_TO_DTYPE = {8: "int8", 4: "int4", 2: "int2", 16: "none"}


@dataclass
class BuildSettings:
    """What to build. ``weight_bits`` is the parameter-weighted average weight width (protected layers count at
    16 bits); ``activations`` is ``"int8"`` (static, calibrated), ``"dynamic"`` (int8, run-time range) or
    ``"none"``."""

    prompts: Sequence[str]
    weight_bits: float = 4.0
    activations: str = "int8"
    steps: int = 4
    guidance: float = 1.0
    height: int | None = None
    width: int | None = None
    seed: int = 0
    widths: dict[str, list[int]] = field(default_factory=lambda: {"content": [2, 4, 8], "quality": [4, 8]})
    content_patterns: Sequence[str] = CONTENT_PATTERNS
    protected: Sequence[str] = ()
    split_ratios: Sequence[float] = (0.5, 0.75, 1.0, 1.5, 2.0)
    budget_mode: str = "at_most"
    tolerance: float = 0.02
    bos: bool = True
    component: str | None = None
    #: directory for the resumable sensitivity cache (None: no cache)
    cache_dir: str | None = None


@dataclass
class BuildReport:
    """Numbers from a build: phase times, denoiser evaluations, solver statistics, the candidates' MSE."""

    seconds: dict[str, float] = field(default_factory=dict)
    denoiser_evaluations: dict[str, int] = field(default_factory=dict)
    solver: list[dict[str, Any]] = field(default_factory=list)
    candidate_mse: list[float] = field(default_factory=list)
    chosen_k: float | None = None


def denoiser_of(pipe, component: str | None = None) -> tuple[str, nn.Module]:
    if component is not None:
        module = getattr(pipe, component, None)
        if not isinstance(module, nn.Module):
            raise MixDQError(f"{type(pipe).__name__} has no model component '{component}'.")
        return component, module
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            return name, module
    raise MixDQError(f"{type(pipe).__name__} has no 'unet' or 'transformer' to build a plan for.")


def _run_pipeline(pipe, s: BuildSettings) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(s.seed + i) for i in range(len(s.prompts))]
    out = pipe(list(s.prompts), num_inference_steps=s.steps, guidance_scale=s.guidance, generator=gens,
               height=s.height, width=s.width, output_type="pt")
    return out.images.float().cpu()


@contextmanager
def applied(denoiser: nn.Module, plan: BitPlan, bos_state: torch.Tensor | None = None):
    """Temporarily quantize ``denoiser`` in memory per a resolved ``plan`` (restored on exit)."""
    from ..apply.backend import quantize_module

    originals = {}
    try:
        for name, spec in plan.layer_specs().items():
            if not spec.is_quantized:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = denoiser.get_submodule(parent_name) if parent_name else denoiser
            originals[name] = (parent, child, getattr(parent, child))
            setattr(parent, child, quantize_module(originals[name][2], spec, bos_state=bos_state))
        yield denoiser
    finally:
        for parent, child, module in originals.values():
            setattr(parent, child, module)


def _distributed_state():
    """accelerate's process state when running sharded (more than one process), e.g. under
    ``accelerate launch --multi_gpu --num_processes 2 $(which mixdq) build RECIPE`` or ``torchrun``."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    # on a machine without CUDA, accelerate only forms a process group when asked for CPU (gloo)
    state = PartialState(cpu=not torch.cuda.is_available())
    return state if state.num_processes > 1 else None


def is_main_process() -> bool:
    state = _distributed_state()
    return state is None or state.is_main_process


def sweep_key(denoiser: nn.Module, s: BuildSettings) -> str:
    """Identifies a sensitivity sweep: the model's structure and weights sample, the prompts and the settings that
    change scores. A cache file is reused only for the same key."""
    from ..plan.layers import fingerprint

    h = hashlib.sha256()
    h.update(fingerprint(layer_table(denoiser)).encode())
    for p in list(denoiser.parameters())[:4]:  # cheap guard against another checkpoint of the same architecture
        h.update(p.detach().float().flatten()[:256].numpy().tobytes())
    fields = [list(s.prompts), s.steps, s.guidance, s.height, s.width, s.seed, s.widths, list(s.content_patterns),
              list(s.protected), s.bos]
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@dataclass
class Calibration:
    """The full-precision run: recorded denoiser calls and images, input ranges, BOS state and layers."""

    recording: Recording
    ranges: dict[str, float]
    bos_state: torch.Tensor | None
    bos_layers: list[str]


def calibrate(pipe, settings: BuildSettings) -> Calibration:
    """One full-precision pipeline run over the prompts, recording the denoiser's calls, the images and every
    layer's input absmax (token 0 left out for the layers that will be BOS-aware)."""
    from ..bos import NonCausalEncoderError, attach_bos, bos_hidden_state

    _, denoiser = denoiser_of(pipe, settings.component)
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

    def run():
        holder["rec"] = record_run(pipe, denoiser, lambda: _run_pipeline(pipe, settings))

    ranges = record_input_ranges(denoiser, run, skip_first_token=bos_layers)
    return Calibration(holder["rec"], ranges, bos_state, bos_layers)


def calibrated_plan(pipe, plan: BitPlan, settings: BuildSettings) -> BitPlan:
    """``plan`` resolved against ``pipe``'s denoiser with calibrated static ranges and the BOS state attached
    (e.g. a uniform W8A8 plan: ``BitPlan.uniform("int8", activations="int8")`` has no ranges of its own)."""
    from ..bos import attach_bos

    _, denoiser = denoiser_of(pipe, settings.component)
    calib = calibrate(pipe, settings)
    if calib.bos_state is not None:
        plan = attach_bos(plan, calib.bos_state)
    resolved = plan.resolve(denoiser, act_ranges=calib.ranges)
    resolved.provenance = {
        **plan.provenance,
        "tool": "diffusers-mixdq calibrate",
        "prompts_sha256": hashlib.sha256("\n".join(settings.prompts).encode()).hexdigest(),
        "num_prompts": len(settings.prompts),
        "steps": settings.steps,
        "guidance": settings.guidance,
    }
    return resolved


def build_plan(pipe, settings: BuildSettings, progress: bool = True) -> tuple[BitPlan, BuildReport]:
    """Build a plan for ``pipe``'s denoiser (see the module docstring). Returns the plan and a report."""
    from ..bos import attach_bos

    report = BuildReport()
    s = settings
    if s.activations not in ("int8", "dynamic", "none"):
        raise MixDQError(f"activations must be 'int8', 'dynamic' or 'none', got {s.activations!r}.")
    _, denoiser = denoiser_of(pipe, settings.component)
    table = layer_table(denoiser)
    groups = {n: layer_group(n, s.content_patterns) for n in table}
    protected = [n for n in table if any(fnmatch.fnmatchcase(n, p) for p in s.protected)]

    # 1-2. calibration: one full-precision run; BOS state when the encoder is causal
    t0 = time.perf_counter()
    calib = calibrate(pipe, s)
    rec, ranges, bos_state = calib.recording, calib.ranges, calib.bos_state
    report.seconds["calibrate"] = time.perf_counter() - t0
    report.denoiser_evaluations["calibrate"] = rec.num_calls

    def act_spec_defaults():
        if s.activations == "none":
            return {"activations": "none"}
        return {"activations": "int8", "act_range": "dynamic"} if s.activations == "dynamic" else {
            "activations": "int8"}

    # 3. sensitivity of weights, one layer at a time
    t0 = time.perf_counter()
    candidates = [n for n in table if n not in protected]
    reference = rec.images

    def content_score() -> float:
        from torchmetrics.functional.image import structural_similarity_index_measure

        with torch.no_grad():
            images = _run_pipeline(pipe, s)
        return float(structural_similarity_index_measure(images, reference, data_range=1.0))

    cache_path = Path(s.cache_dir) / f"sensitivity-{sweep_key(denoiser, s)}.json" if s.cache_dir else None
    state = _distributed_state()
    if state is not None and cache_path is None:
        raise MixDQError("A sharded build (accelerate launch) needs a cache directory to merge the shards' scores.")
    cache = ScoreCache(cache_path)
    if state is not None:
        cache = cache.shard(state.process_index)
    sens = weight_sensitivity(
        denoiser, candidates, s.widths, rec, content_score, rec.num_calls, groups, progress=progress, cache=cache,
        shard=(state.process_index, state.num_processes) if state is not None else (0, 1),
    )
    if state is not None:  # every shard waits for the others, then reads all parts
        state.wait_for_everyone()
        merged = ScoreCache(cache_path)
        for name in candidates:
            for bits in s.widths[groups[name]]:
                sens.scores[name][bits] = merged.get(name, bits)
        report.denoiser_evaluations["shards"] = state.num_processes
    report.seconds["sensitivity"] = time.perf_counter() - t0
    report.denoiser_evaluations["sensitivity"] = sens.denoiser_evaluations

    # 4. allocation per group, k swept, final pick by image MSE vs full precision
    t0 = time.perf_counter()
    problem = AllocationProblem(
        layers=[LayerChoice(n, table[n].numel, groups[n], sens.scores[n]) for n in candidates],
        budget_bits=s.weight_bits,
        tolerance=s.tolerance,
        mode=s.budget_mode,
        fixed=[FixedLayer(n, table[n].numel, 16, groups[n]) for n in protected],
    )
    allocations = sweep(problem, ks=s.split_ratios)
    report.solver = [
        {"k": a.k, "status": a.status, "objective": a.objective, "avg_bits": a.avg_bits, "seconds": a.seconds,
         "mip_gap": a.mip_gap}
        for a in allocations
    ]

    def to_plan(allocation) -> BitPlan:
        layers = {}
        for name in table:
            bits = int(allocation.choice.get(name, 16))
            entry: dict[str, Any] = {"weights": BITS_TO_DTYPE[bits]}
            if name in protected:
                entry["activations"] = "none"
            else:
                entry.update(act_spec_defaults())
                if entry["activations"] == "int8" and "act_range" not in entry:
                    entry["act_range"] = max(ranges.get(name, 1.0), 1e-6)
            layers[name] = entry
        plan = BitPlan(layers=layers)
        if bos_state is not None:
            plan = attach_bos(plan, bos_state)
        return plan.resolve(denoiser)

    plans = {id(a): to_plan(a) for a in allocations}
    mse_of = {}

    def image_mse(allocation) -> float:
        with applied(denoiser, plans[id(allocation)], bos_state), torch.no_grad():
            images = _run_pipeline(pipe, s)
        mse_of[id(allocation)] = float((images - reference).pow(2).mean())
        return mse_of[id(allocation)]

    best = pick(allocations, image_mse)
    report.candidate_mse = [mse_of[id(a)] for a in allocations]
    report.chosen_k = best.k
    report.seconds["allocate"] = time.perf_counter() - t0
    report.denoiser_evaluations["pick"] = rec.num_calls * len(allocations)

    plan = plans[id(best)]
    plan.provenance = {
        "tool": "diffusers-mixdq build",
        "settings": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in asdict(s).items()
                     if k != "prompts"},
        "prompts_sha256": hashlib.sha256("\n".join(s.prompts).encode()).hexdigest(),
        "num_prompts": len(s.prompts),
        "sensitivity_metric": sens.metric,
        "allocation": {"k": best.k, "avg_bits": best.avg_bits, "status": best.status, "mip_gap": best.mip_gap,
                       "candidates": report.solver, "candidate_mse": report.candidate_mse},
        "denoiser_evaluations": report.denoiser_evaluations,
        "seconds": report.seconds,
    }
    return plan, report
