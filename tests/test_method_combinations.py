"""Issue #14's methods together: balancing / low-rank corrections with outlier rows and timestep groups, and the
allocator budget that pays for both the correction factors and the outlier rows."""

from __future__ import annotations

import pytest
import torch
from conftest import make_unet, unet_inputs
from torch import nn

from diffusers_mixdq import BitPlan
from diffusers_mixdq.apply import quantize_module
from diffusers_mixdq.apply.corrections import balance_input, corrected_weight, lowrank_branch
from diffusers_mixdq.apply.outliers import int8_rows
from diffusers_mixdq.builder import BuildSettings
from diffusers_mixdq.builder.fit_corrections import candidate
from diffusers_mixdq.builder.layer_inputs import LayerInputs
from diffusers_mixdq.builder.plan_stages import allocator_budget, correction_overhead, method_stages, outlier_overhead
from diffusers_mixdq.builder.recording import Calibration, record_run
from diffusers_mixdq.plan import LayerSpec


def test_outlier_rows_come_from_the_corrected_weight_and_serve_the_balanced_input():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    x = torch.randn(16, 64)
    x[:, 5] *= 40.0
    base = LayerSpec("int4", "int8", float(x.abs().max()))
    cspec, tensors = candidate("l", base, LayerInputs(x.abs().amax(dim=0), x), layer.weight, 0.5, rank=2)
    channels = [3, 17]
    spec = LayerSpec(cspec.weights, cspec.activations, cspec.act_range, cspec.flags,
                     outliers={"weights": "int8", "channels": channels})
    q = quantize_module(layer, spec, tensors=tensors, name="l")
    w = corrected_weight(layer.weight, q.mixdq_balance, q.lowrank_down, q.lowrank_up)
    values, scale = int8_rows(w[channels])
    assert torch.equal(q.outlier_weight, values)  # the rows of the weight that is quantized, not of W
    with torch.no_grad():
        y = q(x)
        xq = q.quantize_input(balance_input(q, x))  # balanced, then quantized: the outlier rows' input
        expected = nn.functional.linear(xq, values.float() * scale.to(q.outlier_scale.dtype)[:, None],
                                        layer.bias[channels]) + lowrank_branch(q, balance_input(q, x))[:, channels]
    assert torch.allclose(y[:, channels], expected, rtol=1e-4, atol=1e-4)


def calibration(model) -> Calibration:
    """Four recorded calls of a tiny UNet at two timesteps (two groups)."""
    def run():
        for seed, t in ((1, 900), (2, 800), (3, 100), (4, 50)):
            x, _, e = unet_inputs(seed)
            model(x, torch.tensor([t, t]), e)
    return Calibration(record_run(None, model, run), {}, None, [])


def test_timestep_group_ranges_of_a_balanced_layer_follow_its_static_range(tmp_path):
    torch.manual_seed(0)
    model = make_unet()
    calib = calibration(model)
    plan = BitPlan(defaults={"weights": "int4", "activations": "int8", "act_range": 4.0},
                   ignore=["conv_in", "conv_out"]).resolve(model)
    plain = method_stages(plan, model, calib, BuildSettings(prompts=["x"], act_timestep_groups=2))
    both = method_stages(plan, model, calib, BuildSettings(prompts=["x"], act_timestep_groups=2, balance=True))
    balanced = [n for n, e in both.layers.items() if (e.get("flags") or {}).get("balance")]
    assert balanced and both.tensors  # the stages ran in order and the plan keeps its sidecar
    for name in balanced:
        k = both.layers[name]["act_range"] / plan.layers[name]["act_range"]
        got = [g[2] for g in both.layers[name]["act_groups"]]
        assert got == pytest.approx([g[2] * k for g in plain.layers[name]["act_groups"]])
    unbalanced = [n for n, e in both.layers.items() if n not in balanced and e.get("act_groups")]
    for name in unbalanced:
        assert both.layers[name]["act_groups"] == plain.layers[name]["act_groups"]
    both.save(tmp_path / "plan")
    BitPlan.load(tmp_path / "plan").resolve(model)  # a valid plan, its sidecar checked on load


def test_allocator_budget_pays_for_factors_and_outlier_rows():
    unet = make_unet()
    s = BuildSettings(prompts=["a"], weight_bits=4.0, balance=True, lowrank_rank=2, outlier_fraction=0.05)
    factors = correction_overhead(s, unet)
    assert factors > 0
    assert allocator_budget(s, unet).weight_bits == pytest.approx(4.0 - factors - outlier_overhead(unet, 0.05))
    assert correction_overhead(BuildSettings(prompts=["a"]), unet) == 0.0


def test_distillation_trains_against_the_plan_with_its_outlier_rows(monkeypatch, tmp_path):
    """Adapters correct the quantized weight they were trained with: the int8 rows must be in the plan first."""
    import diffusers_mixdq.builder.plan_stages as stages

    torch.manual_seed(0)
    model = make_unet()
    calib = calibration(model)
    plan = BitPlan(defaults={"weights": "int4", "activations": "int8", "act_range": 4.0},
                   ignore=["conv_in", "conv_out"]).resolve(model)
    seen = []
    real = stages.distill
    monkeypatch.setattr(stages, "distill", lambda d, c, p, s, r=None: seen.append(p) or real(d, c, p, s, r))
    s = BuildSettings(prompts=["x"], outlier_fraction=0.1, distill_seconds=1.0, distill_rank=2,
                      lowrank_layers=["*attn2*"])
    out = method_stages(plan, model, calib, s)
    with_rows = {n for n, e in seen[0].layers.items() if e.get("outliers")}
    assert with_rows and with_rows == {n for n, e in out.layers.items() if e.get("outliers")}
    adapters = {n for n, e in out.layers.items() if "adapter" in (e.get("flags") or {})}
    assert adapters and adapters <= with_rows  # the distilled layers have their rows
    out.save(tmp_path / "plan")
    BitPlan.load(tmp_path / "plan").resolve(model)
