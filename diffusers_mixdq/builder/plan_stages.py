"""The optional stages after allocation (each off by default, each switchable for an ablation):

* **timestep groups** (``act_timestep_groups`` / recipe ``activations.timestep_groups``, :mod:`.timestep_ranges`):
  static activation ranges per group of the sampler's timesteps, recorded by replaying the calibration's calls;
* **outlier widths** (``outlier_fraction`` / recipe ``weights.outlier_fraction``, :mod:`.outlier_channels`): the
  highest-kurtosis output channels of int4 / int2 layers get an int8 copy of their row. Its bits count against
  the budget: the allocator is given ``weight_bits`` less what the copies would add if every layer had them
  (:func:`allocator_budget`, an upper bound), so the plan stays within the asked average.

Per-token activations need no stage: ``activations: dynamic-token`` writes ``act_range: "dynamic-token"``.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

from torch import nn

from ..plan import BitPlan, layer_table
from ..plan.extras import OUTLIER_INDEX_BITS, OUTLIER_SCALE_BITS
from .outlier_channels import outlier_stage
from .recording import Calibration
from .settings import BuildReport, BuildSettings
from .timestep_ranges import timestep_stage


def outlier_overhead(denoiser: nn.Module, fraction: float) -> float:
    """Average bits per quantizable weight that outlier rows add if every layer has them (an upper bound)."""
    table = layer_table(denoiser)
    extra = sum(math.ceil(fraction * info.shape[0]) * (8 * info.in_features + OUTLIER_SCALE_BITS + OUTLIER_INDEX_BITS)
                for info in table.values())
    return extra / max(1, sum(info.numel for info in table.values()))


def allocator_budget(s: BuildSettings, denoiser: nn.Module) -> BuildSettings:
    """The settings the allocator runs with: the weight budget less what outlier rows may add."""
    if s.outlier_fraction <= 0:
        return s
    return replace(s, weight_bits=s.weight_bits - outlier_overhead(denoiser, s.outlier_fraction))


def method_stages(plan: BitPlan, denoiser: nn.Module, calib: Calibration, s: BuildSettings,
                  report: BuildReport | None = None) -> BitPlan:
    """``plan`` (resolved) after the stages ``s`` switches on, each timed in ``report``."""
    if s.act_timestep_groups > 1:
        t0 = time.perf_counter()
        plan = timestep_stage(plan, denoiser, calib, s.act_timestep_groups)
        if report is not None:
            rec = calib.recording
            report.count("timestep_groups", rec.num_calls, rec.num_samples)
            report.seconds["timestep_groups"] = time.perf_counter() - t0
    if s.outlier_fraction > 0:
        plan = outlier_stage(plan, denoiser, s.outlier_fraction)
    if s.act_timestep_groups > 1 or s.outlier_fraction > 0:
        plan.provenance["stages"] = {"timestep_groups": s.act_timestep_groups, "outlier_fraction": s.outlier_fraction,
                                     "avg_weight_bits": plan.summary().avg_weight_bits}
    return plan
