"""Build a plan the MixDQ way: calibrate → metric-decoupled sensitivity → integer programming → plan.

This is the library core of the recipe builder. Given a loaded pipeline and prompts it:

1. runs the pipeline once in full precision, recording the denoiser's calls and outputs, the reference images,
   and every layer's input range (token 0 left out for BOS-aware layers);
2. finds the text encoder's BOS hidden state when the encoder is causal (BOS-aware K/V layers);
3. scores every layer at every candidate weight width, one layer quantized at a time: content layers by SSIM of
   the final images, quality layers by SQNR of the denoiser output (:mod:`.sensitivity`) — and, when there is
   an activation decision to make, every layer's activations alone at each candidate activation width;
4. allocates weight widths with HiGHS per group under the average-bits budget, sweeping the content/quality split
   ``k`` (:mod:`.allocate`), and keeps the candidate whose images are closest (MSE) to full precision;
   activation widths are allocated the same way under an element-weighted budget, after keeping the most
   activation-sensitive layers' inputs unquantized;
5. returns a resolved :class:`~diffusers_mixdq.BitPlan` with ranges, the BOS state and provenance.

Cheaper than the naive protocol: a quality-layer measurement replays every recorded call on only
``sweep_fraction`` of its samples (a rotating window, so every prompt is seen), a content-layer measurement
generates ``content_fraction`` of the prompts (at least four), a content layer's widest candidate
is extrapolated from the next one rather than measured, a layer with a single candidate is not measured, the
activation sweep runs only when there is an activation decision, and the full-precision run itself is cached on
disk. The report counts denoiser
sample-evaluations against the naive protocol.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import MixDQError
from ..plan import BitPlan
from ..plan import layer_table
from ..plan import LayerSpec
from .allocate import AllocationProblem, FixedLayer, LayerChoice, pick, solve_groups, sweep
from .calibrate import Calibration, load_calibration, record_input_ranges, save_calibration
from .sensitivity import (
    CONTENT_PATTERNS,
    ContentScorer,
    Recording,
    ScoreCache,
    layer_group,
    layer_sensitivity,
    record_run,
    subset_is_exact,
)

BITS_TO_DTYPE = {8: "int8", 4: "int4", 2: "int2", 16: "none"}


@dataclass
class BuildSettings:
    """What to build. ``weight_bits`` is the parameter-weighted average weight width (protected layers count at
    16 bits); ``activations`` is ``"int8"`` (static, calibrated), ``"dynamic"`` (run-time range) or ``"none"``.

    Activations: ``act_widths`` are the candidate activation widths (4 and/or 8), ``act_bits`` the
    element-weighted average over quantized inputs (default: the widest candidate), and the ``act_protect``
    most activation-sensitive layers keep their inputs unquantized (MixDQ keeps a few). ``sweep_fraction`` is
    the share of the calibration samples each sensitivity measurement uses (1.0: the naive protocol).
    ``content_fraction`` is the share of the prompts a content-layer measurement
    generates (at least :data:`MIN_CONTENT_PROMPTS`: image metrics on too few prompts pick the wrong layers), and
    ``extrapolate_widest`` estimates content layers' widest candidate instead of measuring it.
    ``device``: where the pipeline runs during the build (default: where it is); in a sharded build on CUDA
    machines every process takes its own GPU."""

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
    #: directory for the calibration cache and the resumable sensitivity cache (None: no cache)
    cache_dir: str | None = None
    sweep_fraction: float = 0.25
    content_fraction: float = 0.5
    extrapolate_widest: bool = True
    act_widths: list[int] = field(default_factory=lambda: [8])
    act_bits: float | None = None
    act_protect: int = 0
    device: str | None = None

    def validate(self) -> None:
        if self.activations not in ("int8", "dynamic", "none"):
            raise MixDQError(f"activations must be 'int8', 'dynamic' or 'none', got {self.activations!r}.")
        for name in ("sweep_fraction", "content_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise MixDQError(f"{name} must be in (0, 1], got {getattr(self, name)}.")
        if not self.act_widths or any(w not in (4, 8) for w in self.act_widths):
            raise MixDQError(f"act_widths must be a non-empty list of 4 and 8, got {self.act_widths!r}.")
        if self.act_bits is not None and not min(self.act_widths) <= self.act_bits <= max(self.act_widths):
            raise MixDQError(
                f"act_bits={self.act_bits} is outside what the activation candidates {sorted(self.act_widths)} can "
                f"average; give a budget between {min(self.act_widths)} and {max(self.act_widths)}."
            )
        if self.act_protect < 0:
            raise MixDQError(f"act_protect must be >= 0, got {self.act_protect}.")
        if self.activations == "none" and (self.act_protect or self.act_bits is not None):
            raise MixDQError("act_bits / act_protect need quantized activations; set activations to int8 or dynamic.")

    @property
    def activation_sweep(self) -> bool:
        """Whether an activation decision is left to make (else activations are not measured)."""
        return self.activations != "none" and (len(set(self.act_widths)) > 1 or self.act_protect > 0)


@dataclass
class BuildReport:
    """Numbers from a build: phase times, denoiser calls and sample-evaluations per phase (and what the naive
    protocol would have cost), solver statistics, the candidates' MSE."""

    seconds: dict[str, float] = field(default_factory=dict)
    denoiser_evaluations: dict[str, int] = field(default_factory=dict)
    sample_evaluations: dict[str, int] = field(default_factory=dict)
    naive_sample_evaluations: int = 0
    activation_solver: list[dict[str, Any]] = field(default_factory=list)
    solver: list[dict[str, Any]] = field(default_factory=list)
    candidate_mse: list[float] = field(default_factory=list)
    chosen_k: float | None = None

    @property
    def reduction(self) -> float | None:
        """Naive sample-evaluations / ours (the same calibration and final pick counted on both sides)."""
        ours = sum(self.sample_evaluations.values())
        return self.naive_sample_evaluations / ours if ours else None


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


def _run_pipeline(pipe, s: BuildSettings, indices: Sequence[int] | None = None) -> torch.Tensor:
    """Images of prompts ``indices`` (default all); prompt ``i`` always uses seed ``s.seed + i``."""
    indices = range(len(s.prompts)) if indices is None else indices
    from ..sampling import generate

    images, _ = generate(pipe, [s.prompts[i] for i in indices], [s.seed + i for i in indices], s.steps, s.guidance,
                         height=s.height, width=s.width, grad_mode=None)
    return images


#: content-layer measurements generate at least this many prompts (on the demo model, SSIM on 2 of 8 prompts chose
#: int2 layers that cost 11 dB of PSNR; 4 of 8 matched the naive protocol: benchmarks/builder_cost.py)
MIN_CONTENT_PROMPTS = 4


def prompt_subset(n: int, fraction: float, minimum: int = 1) -> list[int]:
    """``max(minimum, round(fraction * n))`` prompt indices (all when there are fewer) spread evenly over ``0..n-1``."""
    k = min(n, max(minimum, 1, round(fraction * n)))
    return [i * n // k for i in range(k)]


@contextmanager
def applied(denoiser: nn.Module, plan: BitPlan, bos_state: torch.Tensor | None = None):
    """Temporarily quantize ``denoiser`` in memory per a resolved ``plan`` (restored on exit)."""
    from ..apply import quantize_module

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


def build_device(settings: BuildSettings, state=None) -> torch.device | None:
    """Where the build runs: in a sharded build on a CUDA machine, each process's own GPU (``state.device``, which
    accelerate sets from ``LOCAL_RANK``); else ``settings.device``; ``None`` leaves the pipeline where it is."""
    if state is not None and torch.cuda.is_available() and state.device.type == "cuda":
        return state.device
    return torch.device(settings.device) if settings.device else None


def _prepare(pipe, settings: BuildSettings):
    """The process state of a sharded build (or ``None``) and the denoiser, with the pipeline on its device."""
    state = _distributed_state()
    device = build_device(settings, state)
    if device is not None:
        pipe.to(device)
    return state, denoiser_of(pipe, settings.component)[1]


def is_main_process() -> bool:
    state = _distributed_state()
    return state is None or state.is_main_process


def calibration_key(denoiser: nn.Module, s: BuildSettings) -> str:
    """Identifies a full-precision calibration run: the model's structure and a sample of its weights, the prompts
    and the settings of the run."""
    from ..plan import fingerprint

    h = hashlib.sha256()
    h.update(fingerprint(layer_table(denoiser)).encode())
    for p in list(denoiser.parameters())[:4]:  # cheap guard against another checkpoint of the same architecture
        h.update(p.detach().float().flatten()[:256].cpu().numpy().tobytes())
    fields = [list(s.prompts), s.steps, s.guidance, s.height, s.width, s.seed, s.bos, str(next(denoiser.parameters()).dtype)]
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def sweep_key(denoiser: nn.Module, s: BuildSettings) -> str:
    """Identifies a sensitivity sweep: the calibration and what changes a score (the groups' metrics, the share of
    samples measured). A cache file is reused only for the same key; candidate widths may change freely."""
    h = hashlib.sha256(calibration_key(denoiser, s).encode())
    h.update(json.dumps([list(s.content_patterns), s.sweep_fraction, s.content_fraction]).encode())
    return h.hexdigest()[:16]


def calibrate(pipe, settings: BuildSettings) -> Calibration:
    """One full-precision pipeline run over the prompts, recording the denoiser's calls, the images and every
    layer's input absmax and size (token 0 left out for the layers that will be BOS-aware).

    With ``settings.cache_dir`` the run is kept on disk (``calibration-<key>.safetensors``) and a later build with
    the same model, prompts and run settings loads it instead; in a sharded build the main process calibrates and
    the others load its file."""

    _, denoiser = denoiser_of(pipe, settings.component)
    path = None
    if settings.cache_dir:
        path = Path(settings.cache_dir) / f"calibration-{calibration_key(denoiser, settings)}.safetensors"
    device = next(denoiser.parameters()).device
    state = _distributed_state()
    if state is not None and path is not None:
        if state.is_main_process:
            calib = _calibrate_cached(pipe, settings, denoiser, path, device)
        state.wait_for_everyone()
        if not state.is_main_process:
            calib = load_calibration(path, device) or _calibrate_now(pipe, settings, denoiser)
        return calib
    if path is not None:
        return _calibrate_cached(pipe, settings, denoiser, path, device)
    return _calibrate_now(pipe, settings, denoiser)


def _calibrate_cached(pipe, settings, denoiser, path: Path, device) -> Calibration:
    calib = load_calibration(path, device)
    if calib is None:
        calib = _calibrate_now(pipe, settings, denoiser)
        save_calibration(calib, path)
    return calib


def _calibrate_now(pipe, settings: BuildSettings, denoiser: nn.Module) -> Calibration:
    from ..bos import NonCausalEncoderError, attach_bos, bos_hidden_state

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

    def run():
        holder["rec"] = record_run(pipe, denoiser, lambda: _run_pipeline(pipe, settings))

    ranges = record_input_ranges(denoiser, run, skip_first_token=bos_layers, elements=elements)
    return Calibration(holder["rec"], ranges, bos_state, bos_layers, elements)


def calibrated_plan(pipe, plan: BitPlan, settings: BuildSettings) -> BitPlan:
    """``plan`` resolved against ``pipe``'s denoiser with calibrated static ranges and the BOS state attached
    (e.g. a uniform W8A8 plan: ``BitPlan.uniform("int8", activations="int8")`` has no ranges of its own)."""
    from ..bos import attach_bos

    _, denoiser = _prepare(pipe, settings)
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


def extrapolate_ssim(score: float, bits: int, wider: int) -> float:
    """SSIM at ``wider`` bits from SSIM at ``bits``: quantization noise power falls 4x per extra bit, and for small
    noise the SSIM loss is proportional to it, so ``1 - s_wider = (1 - s_bits) / 4**(wider - bits)`` (an 8-bit
    layer keeps 1/256 of its 4-bit loss: whatever its true value, it can hardly change the allocation)."""
    return 1.0 - (1.0 - score) / 4 ** (wider - bits)


def _damage(score: float, metric: str) -> float:
    """How much a score says the layer hurts: noise power relative to the signal for SQNR (dB), 1 - SSIM."""
    return 10 ** (-score / 10) if metric == "sqnr_db" else max(1.0 - score, 0.0)


def most_sensitive(scores: dict[str, float], groups: dict[str, str], metric: dict[str, str], count: int) -> list[str]:
    """The ``count`` layers whose score hurts most. Groups are scored on different scales, so each layer's damage
    (:func:`_damage`) is taken relative to the mean damage of its group before ranking across groups."""
    damage = {n: _damage(v, metric[groups[n]]) for n, v in scores.items()}
    mean = {g: sum(d for n, d in damage.items() if groups[n] == g) / max(1, sum(groups[n] == g for n in damage))
            for g in set(groups[n] for n in damage)}
    relative = {n: d / mean[groups[n]] if mean[groups[n]] > 0 else 0.0 for n, d in damage.items()}
    return sorted(relative, key=lambda n: (-relative[n], n))[:count]


def build_plan(pipe, settings: BuildSettings, progress: bool = True) -> tuple[BitPlan, BuildReport]:
    """Build a plan for ``pipe``'s denoiser (see the module docstring). Returns the plan and a report."""
    from ..bos import attach_bos

    report = BuildReport()
    s = settings
    s.validate()
    state, denoiser = _prepare(pipe, s)
    table = layer_table(denoiser)
    groups = {n: layer_group(n, s.content_patterns) for n in table}
    protected = [n for n in table if any(fnmatch.fnmatchcase(n, p) for p in s.protected)]
    if s.cache_dir is None and state is not None:
        raise MixDQError("A sharded build (accelerate launch) needs a cache directory to merge the shards' scores.")

    # 1-2. calibration: one full-precision run (or its copy on disk); BOS state when the encoder is causal
    t0 = time.perf_counter()
    calib = calibrate(pipe, s)
    rec, ranges, bos_state = calib.recording, calib.ranges, calib.bos_state
    report.seconds["calibrate"] = time.perf_counter() - t0
    report.denoiser_evaluations["calibrate"] = rec.num_calls
    report.sample_evaluations["calibrate"] = rec.num_samples
    naive = rec.num_samples  # the naive protocol calibrates too

    # 3. sensitivity, one layer at a time, on a share of the recorded samples
    t0 = time.perf_counter()
    candidates = [n for n in table if n not in protected]
    reference = rec.images
    quality_rec = rec.subset(s.sweep_fraction)
    if quality_rec is not rec:
        report.denoiser_evaluations["subset_check"] = quality_rec.num_calls
        report.sample_evaluations["subset_check"] = quality_rec.num_samples
        if not subset_is_exact(denoiser, quality_rec):
            warnings.warn(f"{type(denoiser).__name__} does not compute its samples independently; measuring on "
                          "every recorded sample (sweep_fraction ignored for quality layers).", stacklevel=2)
            quality_rec = rec
    content_prompts = prompt_subset(len(s.prompts), s.content_fraction, MIN_CONTENT_PROMPTS)

    def content_score() -> float:
        from torchmetrics.functional.image import structural_similarity_index_measure

        with torch.no_grad():
            images = _run_pipeline(pipe, s, content_prompts)
        return float(structural_similarity_index_measure(images, reference[content_prompts], data_range=1.0))

    content = ContentScorer(content_score, (rec.num_calls, rec.num_samples * len(content_prompts) // len(s.prompts)))
    cache_path = Path(s.cache_dir) / f"sensitivity-{sweep_key(denoiser, s)}.json" if s.cache_dir else None
    cache = ScoreCache(cache_path)
    if state is not None:
        cache = cache.shard(state.process_index)
    shard = (state.process_index, state.num_processes) if state is not None else (0, 1)
    common = dict(quality_rec=quality_rec, content=content, naive_cost=(rec.num_calls, rec.num_samples),
                  bos_state=bos_state, progress=progress, cache=cache, shard=shard)

    # a layer with one candidate width has no decision to make: it is not measured; nor is the widest width of a
    # content layer (SSIM) when extrapolated from the next one
    sweep_widths = {g: sorted(set(ws)) if len(set(ws)) > 1 else [] for g, ws in s.widths.items()}
    extrapolated = {}
    if s.extrapolate_widest and len(sweep_widths.get("content", [])) > 1:
        *rest, widest = sweep_widths["content"]
        extrapolated = {"content": (widest, rest[-1])}
        sweep_widths["content"] = rest
    sens = layer_sensitivity(denoiser, candidates, sweep_widths, groups, lambda n, b: LayerSpec(f"int{b}"),
                             kind="weights", **common)
    act_sens = None
    if s.activation_sweep:
        t_act = time.perf_counter()
        bos_layers = set(calib.bos_layers)

        def act_spec(name: str, bits: int) -> LayerSpec:
            act_range = "dynamic" if s.activations == "dynamic" else max(ranges.get(name, 1.0), 1e-6)
            return LayerSpec("none", f"int{bits}", act_range, {"bos_aware": True} if name in bos_layers else {})

        act_sens = layer_sensitivity(denoiser, candidates, {g: list(s.act_widths) for g in ("content", "quality")},
                                     groups, act_spec, kind="activations", **common)
        report.seconds["activation_sensitivity"] = time.perf_counter() - t_act
    if state is not None:  # every shard waits for the others, then reads all parts
        state.wait_for_everyone()
        merged = ScoreCache(cache_path)
        for result in (sens, act_sens):
            if result is not None:
                result.fill_from(merged)
        report.denoiser_evaluations["shards"] = state.num_processes
    for name in candidates:  # after the shards' scores are merged
        if groups[name] in extrapolated:
            widest, below = extrapolated[groups[name]]
            sens.scores[name][widest] = extrapolate_ssim(sens.scores[name][below], below, widest)
    report.seconds["sensitivity"] = time.perf_counter() - t0 - report.seconds.get("activation_sensitivity", 0.0)
    report.denoiser_evaluations["sensitivity"] = sens.cost.calls
    report.sample_evaluations["sensitivity"] = sens.cost.samples
    # the naive protocol measures every candidate width of every layer, on every sample and every prompt
    naive += rec.num_samples * sum(len(set(s.widths[groups[n]])) for n in candidates)
    if act_sens is not None:
        report.denoiser_evaluations["activation_sensitivity"] = act_sens.cost.calls
        report.sample_evaluations["activation_sensitivity"] = act_sens.cost.samples
        naive += act_sens.naive.samples

    # 4. weights: allocation per group, k swept, final pick by image MSE vs full precision
    t0 = time.perf_counter()
    problem = AllocationProblem(
        layers=[LayerChoice(n, table[n].numel, groups[n], sens.scores[n] or {w: 0.0 for w in s.widths[groups[n]]})
                for n in candidates],
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

    # activations: the most sensitive inputs stay unquantized, the rest share the element-weighted budget
    act_choice: dict[str, int | None] = {n: None for n in table}
    if s.activations != "none":
        widest = max(s.act_widths)
        kept = []
        if s.act_protect and act_sens is not None:
            kept = most_sensitive({n: act_sens.scores[n][widest] for n in candidates}, groups, act_sens.metric,
                                  s.act_protect)
        free = [n for n in candidates if n not in kept]
        if act_sens is None or len(set(s.act_widths)) == 1:
            act_choice.update({n: widest for n in free})
        else:
            act_problem = AllocationProblem(
                layers=[LayerChoice(n, max(calib.elements.get(n, 0.0), 1.0), groups[n], act_sens.scores[n])
                        for n in free],
                budget_bits=s.act_bits if s.act_bits is not None else widest, tolerance=s.tolerance, mode="at_most",
            )
            act_alloc = solve_groups(act_problem, k=1.0)
            act_choice.update({n: int(b) for n, b in act_alloc.choice.items()})
            report.activation_solver = [{"status": act_alloc.status, "objective": act_alloc.objective,
                                         "avg_bits": act_alloc.avg_bits, "seconds": act_alloc.seconds,
                                         "mip_gap": act_alloc.mip_gap, "group_bits": act_alloc.group_bits}]

    def act_entry(name: str) -> dict[str, Any]:
        bits = act_choice[name]
        if bits is None:
            return {"activations": "none"}
        if s.activations == "dynamic":
            return {"activations": f"int{bits}", "act_range": "dynamic"}
        return {"activations": f"int{bits}", "act_range": max(ranges.get(name, 1.0), 1e-6)}

    def to_plan(allocation) -> BitPlan:
        layers = {n: {"weights": BITS_TO_DTYPE[int(allocation.choice.get(n, 16))], **act_entry(n)} for n in table}
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
    report.sample_evaluations["pick"] = rec.num_samples * len(allocations)
    report.naive_sample_evaluations = naive + rec.num_samples * len(allocations)

    plan = plans[id(best)]
    metrics = {"weights": sens.metric}
    if act_sens is not None:
        metrics["activations"] = act_sens.metric
    plan.provenance = {
        "tool": "diffusers-mixdq build",
        "settings": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in asdict(s).items()
                     if k != "prompts"},
        "prompts_sha256": hashlib.sha256("\n".join(s.prompts).encode()).hexdigest(),
        "num_prompts": len(s.prompts),
        "sensitivity_metric": metrics,
        "allocation": {"k": best.k, "avg_bits": best.avg_bits, "status": best.status, "mip_gap": best.mip_gap,
                       "candidates": report.solver, "candidate_mse": report.candidate_mse,
                       "activations": report.activation_solver,
                       "activations_kept_unquantized": [n for n in candidates if act_choice[n] is None]
                       if s.activations != "none" else []},
        "denoiser_evaluations": report.denoiser_evaluations,
        "sample_evaluations": {**report.sample_evaluations, "naive_total": report.naive_sample_evaluations},
        "seconds": report.seconds,
    }
    return plan, report
