"""The correct stage (after write; off by default): channel balancing and low-rank branches for a built plan.

Recipe keys / settings: ``balance`` (bool), ``balance_alphas`` (the grid of ``a``, default 0, 0.25, 0.5, 0.75),
``lowrank_rank`` (0: off), ``lowrank_layers`` (patterns; empty: every layer with quantized weights). For each
quantized layer (Conv2d with ``groups`` 1), :func:`~.fit_corrections.fit_layer` picks the correction with the lowest
output error on calibration inputs (:mod:`.layer_inputs`, one replay of the calibration recording); the result is
written into the layer's flags and the plan's sidecar (format: :mod:`diffusers_mixdq.plan.layer_tensors`).

Budget: low-rank factors and balancing factors are stored bits. :func:`overhead_bits` is what they add to the
parameter-weighted average, and a mixed build lowers the allocator's budget by it, so that the plan's average weight
bits (factors included, as :meth:`BitPlan.summary` counts them) stay within ``weight_bits``.
"""

from __future__ import annotations

import time
from typing import Mapping

from torch import nn

from ..families import matches
from ..plan import BitPlan, LayerInfo, LayerSpec
from ..plan.layer_tensors import ADAPTER, BALANCE, LOWRANK, extra_bits
from .fit_corrections import LayerFit, fit_layer
from .layer_inputs import capture_inputs
from .recording import Calibration
from .settings import BuildReport, BuildSettings


def enabled(s: BuildSettings) -> bool:
    return bool(s.balance or s.lowrank_rank)


def _eligible(module: nn.Module) -> bool:
    return not isinstance(module, nn.Conv2d) or (module.groups == 1 and module.padding_mode == "zeros")


def lowrank_rank(s: BuildSettings, name: str, spec: LayerSpec, rank: int | None = None) -> int:
    """The rank a layer's low-rank branch (or, with ``rank``, adapter) gets (0: none): quantized weights, matching
    ``lowrank_layers``."""
    rank = s.lowrank_rank if rank is None else rank
    if not rank or spec.weights == "none":
        return 0
    return rank if not s.lowrank_layers or any(matches(p, name) for p in s.lowrank_layers) else 0


def overhead_bits(s: BuildSettings, table: Mapping[str, LayerInfo], layers) -> float:
    """Bits per quantizable parameter the correction tensors of ``layers`` (all with quantized weights) add at
    most (every one balanced, every matching one with its low-rank branch and distilled adapter)."""
    if not enabled(s) and s.distill_seconds <= 0:
        return 0.0
    quantized = LayerSpec(weights="int8")
    total = 0
    for name in layers:
        flags: dict = {BALANCE: True} if s.balance else {}
        rank = min(lowrank_rank(s, name, quantized), min(table[name].shape[0], table[name].in_features))
        if rank:
            flags[LOWRANK] = {"rank": rank}
        if s.distill_seconds > 0 and lowrank_rank(s, name, quantized, s.distill_rank):
            flags[ADAPTER] = {"rank": s.distill_rank}
        total += extra_bits(flags, table[name])
    params = sum(info.numel for info in table.values())
    return total / params if params else 0.0


def correct(denoiser: nn.Module, calib: Calibration, plan: BitPlan, s: BuildSettings,
            report: BuildReport | None = None) -> BitPlan:
    """``plan`` (resolved) with balancing / low-rank corrections fitted on ``calib`` (see the module docstring)."""
    t0 = time.perf_counter()
    specs = plan.layer_specs()
    chosen = [n for n, sp in specs.items() if sp.is_quantized and _eligible(denoiser.get_submodule(n))
              and (s.balance or lowrank_rank(s, n, sp))]
    inputs = capture_inputs(denoiser, calib.recording, chosen, calib.bos_layers)
    layers, tensors = {n: dict(v) for n, v in plan.layers.items()}, dict(plan.tensors)
    fits: dict[str, LayerFit] = {}
    for name in chosen:
        if name not in inputs or inputs[name].samples.numel() == 0:
            continue
        alphas = tuple(s.balance_alphas) if s.balance else ()
        fit = fit_layer(name, denoiser.get_submodule(name), specs[name], inputs[name], alphas,
                        lowrank_rank(s, name, specs[name]))
        fits[name] = fit
        layers[name] = fit.spec.to_dict()
        tensors.update(fit.tensors)
    provenance = dict(plan.provenance)
    provenance["corrections"] = _record(s, fits, time.perf_counter() - t0)
    if report is not None:
        report.seconds["correct"] = time.perf_counter() - t0
        rec = calib.recording
        report.count("correct", rec.num_calls, rec.num_samples)
    return BitPlan(target=plan.target, layers=layers, provenance=provenance, tensors=tensors)


def _record(s: BuildSettings, fits: Mapping[str, LayerFit], seconds: float) -> dict:
    """What the provenance keeps of the stage: settings, per-alpha counts, the layers' summed output errors."""
    alphas: dict[str, int] = {}
    for fit in fits.values():
        key = "off" if fit.alpha is None else f"{fit.alpha:g}"
        alphas[key] = alphas.get(key, 0) + 1
    return {
        "balance": bool(s.balance), "balance_alphas": list(s.balance_alphas), "lowrank_rank": s.lowrank_rank,
        "lowrank_layers": list(s.lowrank_layers), "layers": len(fits), "chosen_alpha": alphas,
        "output_mse_before": sum(f.baseline_error for f in fits.values()),
        "output_mse_after": sum(f.error for f in fits.values()), "seconds": seconds,
    }
