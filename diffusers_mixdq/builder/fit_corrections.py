"""Fitting one layer's channel balancing (ViDiT-Q) and low-rank branch (SVDQuant) on its calibration inputs.

* Balancing: ``s_j = max|X_j|^a / max|W_:,j|^(1-a)`` (normalised to geometric mean 1), for each ``a`` of a small
  grid (float16), and no balancing at all; the candidate with the lowest output MSE of the quantized layer (weights and
  activations as the plan says, through the same code that applies plans) against full precision wins.
* Low-rank (with ``rank > 0``): the top-``rank`` singular components of the (balanced) weight, ``up = U sqrt(S)``,
  ``down = sqrt(S) V^T`` stored as float16; the quantized weight is the residual ``W diag(s) - up @ down``. It is
  fitted for each balancing candidate, so the choice of ``a`` accounts for it.

A static activation range scales with the balanced input: ``act_range * max_j(absmax_j / s_j) / max_j(absmax_j)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..apply import quantize_module
from ..apply.corrections import corrected_weight
from ..plan import LayerSpec
from ..plan.layer_tensors import BALANCE, LOWRANK, balance_key, lowrank_keys, tensors_sha256
from .layer_inputs import LayerInputs

_EPS = 1e-5


@dataclass
class LayerFit:
    """The chosen correction of one layer: its spec (flags and range updated), sidecar tensors and errors."""

    spec: LayerSpec
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None
    error: float = 0.0
    baseline_error: float = 0.0


def weight_absmax(weight: torch.Tensor) -> torch.Tensor:
    """Per input channel absolute max of a Linear (``out x in``) or Conv2d (``out x in x kh x kw``) weight."""
    w = weight.detach().float().abs()
    return w.amax(dim=0) if w.dim() == 2 else w.amax(dim=(0, 2, 3))


def balance_factors(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = max|X|^alpha / max|W|^(1-alpha)`` per input channel, geometric mean 1, stored as float16 (the same
    rounded factors scale the weight and the input, so the rounding changes nothing)."""
    s = act_absmax.float().clamp_min(_EPS).pow(alpha) / w_absmax.float().clamp_min(_EPS).pow(1 - alpha)
    return (s / s.log().mean().exp()).clamp(1e-4, 1e4).to(torch.float16)


def lowrank_factors(weight: torch.Tensor, balance: torch.Tensor | None, rank: int) -> tuple[torch.Tensor, ...]:
    """``(down, up)`` float16: the top-``rank`` singular components of ``W diag(s)`` as ``r x in`` and ``out x r``."""
    w = corrected_weight(weight.detach().float(), balance).reshape(weight.shape[0], -1)
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    r = min(rank, sv.numel())
    root = sv[:r].sqrt()
    down, up = (root[:, None] * vh[:r]).to(torch.float16), (u[:, :r] * root).to(torch.float16)
    return down.contiguous(), up.contiguous()


def _scaled_range(spec: LayerSpec, absmax: torch.Tensor, s: torch.Tensor | None) -> Any:
    if spec.activations == "none" or spec.dynamic or s is None:
        return spec.act_range
    ratio = float((absmax / s.float()).max() / absmax.max().clamp_min(_EPS))
    return float(spec.act_range) * ratio


def candidate(name: str, spec: LayerSpec, inputs: LayerInputs, weight: torch.Tensor, alpha: float | None,
              rank: int) -> tuple[LayerSpec, dict[str, torch.Tensor]]:
    """The spec and sidecar tensors of one candidate correction (``alpha`` ``None``: not balanced)."""
    flags = dict(spec.flags)
    tensors: dict[str, torch.Tensor] = {}
    s = None
    if alpha is not None:
        s = balance_factors(inputs.absmax, weight_absmax(weight), alpha)
        tensors[balance_key(name)] = s
        flags[BALANCE] = {"alpha": alpha, "sha256": tensors_sha256(s)}
    if rank > 0:
        down, up = lowrank_factors(weight, s, rank)
        tensors.update(zip(lowrank_keys(name), (down, up)))
        flags[LOWRANK] = {"rank": int(down.shape[0]), "sha256": tensors_sha256(down, up)}
    return LayerSpec(spec.weights, spec.activations, _scaled_range(spec, inputs.absmax, s), flags), tensors


def output_error(module: nn.Module, name: str, spec: LayerSpec, tensors: dict[str, torch.Tensor],
                 samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error of the layer quantized per ``spec`` (BOS rows aside) against ``reference``."""
    flags = {k: v for k, v in spec.flags.items() if k != "bos_aware"}
    plain = LayerSpec(spec.weights, spec.activations, spec.act_range, flags)
    qmodule = quantize_module(module, plain, tensors=tensors, name=name)
    with torch.no_grad():
        return float((qmodule(samples.to(module.weight.dtype)).float() - reference).pow(2).mean())


def fit_layer(name: str, module: nn.Module, spec: LayerSpec, inputs: LayerInputs, alphas: Sequence[float],
              rank: int) -> LayerFit:
    """The best of: no balancing and balancing with each ``alpha`` (each with the low-rank branch when
    ``rank > 0``), by output error on ``inputs.samples``."""
    samples = inputs.samples
    with torch.no_grad():
        reference = module(samples.to(module.weight.dtype)).float()
    baseline = output_error(module, name, spec, {}, samples, reference)
    best: LayerFit | None = None
    for alpha in (None, *alphas):
        cspec, tensors = candidate(name, spec, inputs, module.weight, alpha, rank)
        if not cspec.flags.get(BALANCE) and not cspec.flags.get(LOWRANK):
            error = baseline
        else:
            error = output_error(module, name, cspec, tensors, samples, reference)
        if best is None or error < best.error:
            best = LayerFit(cspec, tensors, alpha, error, baseline)
    return best
