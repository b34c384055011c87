"""The optional stages after allocation (each off by default, each switchable for an ablation), in this order:

* **correct** (``balance`` / ``lowrank_rank``, :mod:`.correct`): channel balancing and low-rank branches;
* **outlier widths** (``outlier_fraction`` / recipe ``weights.outlier_fraction``, :mod:`.outlier_channels`): the
  highest-kurtosis output channels of int4 / int2 layers get an int8 copy of their row. Its bits count against
  the budget: the allocator is given ``weight_bits`` less what the copies would add if every layer had them
  (:func:`allocator_budget`, an upper bound), so the plan stays within the asked average. Before distill, so the
  adapters are trained against the plan as it runs (rows at int8 need other corrections than at int4 / int2);
* **distill** (``distill_seconds`` > 0, :mod:`.distill`): adapters trained against the full-precision run. The
  factors of correct and distill count against the budget: the allocator is given ``weight_bits`` less what they
  may add (:func:`~.correct.overhead_bits`);
* **timestep groups** (``act_timestep_groups`` / recipe ``activations.timestep_groups``, :mod:`.timestep_ranges`):
  static activation ranges per group of the sampler's timesteps, recorded by replaying the calibration's calls
  (a balanced layer's ranges scaled as the correct stage scaled its static range).

Per-token activations need no stage: ``activations: dynamic-token`` writes ``act_range: "dynamic-token"``.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

from torch import nn

from ..plan import BitPlan, layer_table
from ..plan.extras import OUTLIER_INDEX_BITS, OUTLIER_SCALE_BITS
from ..plan.layer_tensors import BALANCE
from .context import protected_layers
from .correct import correct, overhead_bits
from .correct import enabled as correct_enabled
from .distill import distill
from .outlier_channels import outlier_stage
from .recording import Calibration
from .settings import BuildReport, BuildSettings
from .timestep_ranges import timestep_stage, with_layers


def outlier_overhead(denoiser: nn.Module, fraction: float, narrowest: int = 2) -> float:
    """Average bits per quantizable weight that outlier rows add if every layer has them (an upper bound): each
    row moves from the layer's width (at least ``narrowest``) to int8, plus its scale and index."""
    table = layer_table(denoiser)
    row_bits = lambda info: (8 - narrowest) * info.in_features + OUTLIER_SCALE_BITS + OUTLIER_INDEX_BITS  # noqa: E731
    extra = sum(math.ceil(fraction * info.shape[0]) * row_bits(info)
                for info in table.values())
    return extra / max(1, sum(info.numel for info in table.values()))


def correction_overhead(s: BuildSettings, denoiser: nn.Module) -> float:
    """Average bits per quantizable weight the correct / distill stages' factors add at most (every layer whose
    width the allocator chooses with them)."""
    table, s = layer_table(denoiser), s.for_model(denoiser)
    protected = protected_layers(s.protected, table, type(denoiser).__name__)
    return overhead_bits(s, table, [n for n in table if n not in protected])


def allocator_budget(s: BuildSettings, denoiser: nn.Module) -> BuildSettings:
    """The settings the allocator runs with: the weight budget less what outlier rows and correction factors may
    add."""
    overhead = correction_overhead(s, denoiser)
    if s.outlier_fraction > 0:
        overhead += outlier_overhead(denoiser, s.outlier_fraction, min(w for ws in s.widths.values() for w in ws))
    return replace(s, weight_bits=s.weight_bits - overhead) if overhead else s


def rescale_balanced_groups(plan: BitPlan, before: BitPlan) -> BitPlan:
    """A balanced layer quantizes ``x / s``: its timestep-group ranges (recorded on ``x``) scaled by the ratio
    the correct stage scaled its static range by (``before``: the plan before that stage)."""
    layers = {}
    for name, spec in plan.layers.items():
        old = before.layers.get(name, {}).get("act_range")
        if spec.get("act_groups") and (spec.get("flags") or {}).get(BALANCE) and isinstance(old, (int, float)) \
                and old > 0:
            k = spec["act_range"] / old
            spec = {**spec, "act_groups": [[lo, hi, r * k] for lo, hi, r in spec["act_groups"]]}
        layers[name] = spec
    return with_layers(plan, layers)


def method_stages(plan: BitPlan, denoiser: nn.Module, calib: Calibration, s: BuildSettings,
                  report: BuildReport | None = None) -> BitPlan:
    """``plan`` (resolved) after the stages ``s`` switches on, each timed in ``report``."""
    before = plan
    if correct_enabled(s):
        plan = correct(denoiser, calib, plan, s, report)
    if s.outlier_fraction > 0:  # before distill: the adapters learn the plan with its int8 rows
        plan = outlier_stage(plan, denoiser, s.outlier_fraction)
    plan = distill(denoiser, calib, plan, s, report)
    if report is not None and (overhead := correction_overhead(s, denoiser)):
        plan.provenance["budget_overhead_bits"] = overhead
    if s.act_timestep_groups > 1:
        t0 = time.perf_counter()
        plan = timestep_stage(plan, denoiser, calib, s.act_timestep_groups)
        if s.balance:
            plan = rescale_balanced_groups(plan, before)
        if report is not None:
            rec = calib.recording
            report.count("timestep_groups", rec.num_calls, rec.num_samples)
            report.seconds["timestep_groups"] = time.perf_counter() - t0
    if s.act_timestep_groups > 1 or s.outlier_fraction > 0:
        plan.provenance["stages"] = {"timestep_groups": s.act_timestep_groups, "outlier_fraction": s.outlier_fraction,
                                     "avg_weight_bits": plan.summary().avg_weight_bits}
    return plan
