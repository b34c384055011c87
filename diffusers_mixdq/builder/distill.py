"""The distill stage (after correct; off by default): MPQ-DM's time-smoothed relation distillation, simplified.

Every layer with quantized weights (those matching ``lowrank_layers`` when given) gets an adapter branch
``up @ (down @ x')`` of rank ``distill_rank`` (``up`` starts at zero, so the plan starts where it was); the adapters
of the quantized denoiser are trained with Adam against the full-precision run the calibration recorded (the
sampler's own trajectory: every recorded denoiser call and its output), for ``distill_seconds`` of wall time. Loss
per call: the MSE of the denoiser output to full precision plus ``distill_relation`` times the KL divergence between
the softmax-normalised self-similarity maps of the last block's output features (full precision vs quantized).
Activation quantizers pass gradients straight through while training. The adapters go into the plan's flags and
sidecar (``flags.adapter``, :mod:`diffusers_mixdq.plan.layer_tensors`); their bits count like low-rank factors.
Not done (MPQ-DM does): learnable quantization scales, and averaging the relation loss over two consecutive steps.
"""

from __future__ import annotations

import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..apply.activations import ActivationScheme
from ..plan import BitPlan
from ..plan.layer_tensors import ADAPTER, lowrank_keys, tensors_sha256
from .correct import lowrank_rank
from .recording import Calibration, Recording, first_tensor, map_tensors
from .sensitivity import applied
from .settings import BuildReport, BuildSettings


class _StraightThrough(ActivationScheme):
    """An activation scheme whose rounding passes gradients through unchanged (training only)."""

    def __init__(self, inner: ActivationScheme):
        self.inner = inner

    def quantize(self, x, dtype, input_scale):
        return x + (self.inner.quantize(x, dtype, input_scale) - x).detach()


def last_block(denoiser: nn.Module) -> nn.Module:
    """The denoiser's last block (a UNet's last up block, a DiT's last transformer block)."""
    for name in ("up_blocks", "transformer_blocks", "single_transformer_blocks"):
        blocks = getattr(denoiser, name, None)
        if blocks is not None and len(blocks):
            last = blocks[-1]
    return last


def relation_kl(fp: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(P_fp || P_q) of the row-softmaxed self-similarity maps of features ``(B, C, H, W)`` or ``(B, N, C)``."""
    def probs(f):
        f = f.flatten(2).transpose(1, 2) if f.dim() == 4 else f
        return F.log_softmax(f @ f.transpose(1, 2) / f.shape[-1] ** 0.5, dim=-1)

    log_p, log_q = probs(fp.float()), probs(q.float())
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def _add_adapter(module: nn.Module, rank: int, generator: torch.Generator) -> list[torch.Tensor]:
    fan_in = module.weight.shape[1:].numel()
    down = (torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5).to(module.weight.device)
    up = torch.zeros(module.out_features if isinstance(module, nn.Linear) else module.out_channels, rank,
                     device=module.weight.device)
    module.register_buffer("adapter_down", down.requires_grad_(True), persistent=False)
    module.register_buffer("adapter_up", up.requires_grad_(True), persistent=False)
    module.mixdq_corrected = True
    return [module.adapter_down, module.adapter_up]


def _straight_through(denoiser: nn.Module) -> None:
    """Every quantized input of the (temporarily quantized) denoiser passes gradients straight through: a rounding
    anywhere on the way to the output (conv_out included) would otherwise stop them."""
    for module in denoiser.modules():
        if getattr(module, "_act_scheme", None) is not None:
            module._act_scheme = _StraightThrough(module._act_scheme)


def _fp_features(denoiser: nn.Module, rec: Recording) -> list[torch.Tensor]:
    feats: list[torch.Tensor] = []
    handle = last_block(denoiser).register_forward_hook(lambda m, a, out: feats.append(first_tensor(out).detach()))
    try:
        with torch.no_grad():
            for args, kwargs in rec.calls:
                denoiser(*args, **kwargs)
    finally:
        handle.remove()
    return feats


def _trainable(rec: Recording) -> Recording:
    """The recording's calls and outputs as ordinary tensors (a build may run under ``torch.inference_mode()``,
    whose tensors autograd cannot save)."""
    return Recording(calls=[map_tensors(c, torch.clone) for c in rec.calls], outputs=[o.clone() for o in rec.outputs])


def _train(denoiser, rec: Recording, params, fp_feats, s: BuildSettings) -> dict:
    opt = torch.optim.Adam(params, lr=s.distill_lr)
    held: dict[str, torch.Tensor] = {}
    handle = last_block(denoiser).register_forward_hook(lambda m, a, out: held.update(f=first_tensor(out)))
    order, steps, samples, losses, t0 = random.Random(0), 0, 0, [], time.perf_counter()
    try:
        while time.perf_counter() - t0 < s.distill_seconds:
            i = order.randrange(rec.num_calls)
            args, kwargs = rec.calls[i]
            out = first_tensor(denoiser(*args, **kwargs))
            loss = F.mse_loss(out.float(), rec.outputs[i].float())
            loss = loss + s.distill_relation * relation_kl(fp_feats[i], held["f"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            samples += int(out.shape[0])
            losses.append(float(loss.detach()))
    finally:
        handle.remove()
    return {"steps": steps, "samples": samples, "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def distill(denoiser: nn.Module, calib: Calibration, plan: BitPlan, s: BuildSettings,
            report: BuildReport | None = None) -> BitPlan:
    """``plan`` with distilled adapters (see the module docstring); ``plan`` itself when ``distill_seconds`` is 0."""
    if s.distill_seconds <= 0:
        return plan
    with torch.inference_mode(False), torch.enable_grad():
        return _distill(denoiser, calib, plan, s, report)


def _distill(denoiser, calib: Calibration, plan: BitPlan, s: BuildSettings, report: BuildReport | None) -> BitPlan:
    t0 = time.perf_counter()
    specs = plan.layer_specs()
    names = [n for n, sp in specs.items() if lowrank_rank(s, n, sp, s.distill_rank)]
    rec = _trainable(calib.recording)
    fp_feats = _fp_features(denoiser, rec)
    generator = torch.Generator().manual_seed(0)
    layers, tensors = {n: dict(v) for n, v in plan.layers.items()}, dict(plan.tensors)
    with applied(denoiser, plan, calib.bos_state):
        params = [p for n in names for p in _add_adapter(denoiser.get_submodule(n), s.distill_rank, generator)]
        _straight_through(denoiser)
        record = _train(denoiser, rec, params, fp_feats, s)
        for name in names:
            module = denoiser.get_submodule(name)
            down, up = (t.detach().to(torch.float16).contiguous() for t in (module.adapter_down, module.adapter_up))
            tensors.update(zip(lowrank_keys(name, ADAPTER), (down, up)))
            flags = dict(layers[name].get("flags") or {})
            flags[ADAPTER] = {"rank": s.distill_rank, "sha256": tensors_sha256(down, up)}
            layers[name]["flags"] = flags
    provenance = dict(plan.provenance)
    provenance["distillation"] = {"seconds": time.perf_counter() - t0, "rank": s.distill_rank, "lr": s.distill_lr,
                                  "relation_weight": s.distill_relation, "layers": len(names), **record}
    if report is not None:
        report.seconds["distill"] = time.perf_counter() - t0
        # the full-precision features (one replay), then the training steps
        report.count("distill", record["steps"] + rec.num_calls, record["samples"] + rec.num_samples)
    return BitPlan(target=plan.target, layers=layers, provenance=provenance, tensors=tensors)
