"""The demo model's extra plans (packaged in diffusers_mixdq/demo/plans/shapes-extra/, used by benchmarks/peers.py)
fit it and keep their budgets."""

from __future__ import annotations

import pytest

from diffusers_mixdq import BitPlan, demo

#: plan -> (largest average weight bits, weight dtypes it may use)
BUDGETS = {
    "w5a8-mixed": (5.0, {"int2", "int4", "int8"}),
    "w4a8-uniform": (4.0, {"int4"}),
    "w3a8-mixed": (3.0, {"int2", "int4", "int8"}),
}


def test_extra_plans_are_the_budgeted_ones():
    assert set(demo.plans_in(demo.plans_dir("shapes-extra"))) == set(BUDGETS)


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_extra_plan_fits_the_demo_model(name):
    from diffusers_mixdq.cli import load_model_skeleton

    plan = BitPlan.load(demo.plan_path(name, "shapes-extra"))
    unet = load_model_skeleton(demo.pipeline_path())
    assert plan.is_resolved and "bos.hidden_state" in plan.tensors
    assert plan.resolve(unet).layer_specs() == plan.layer_specs()
    specs = plan.layer_specs().values()
    budget, dtypes = BUDGETS[name]
    assert {s.weights for s in specs} <= dtypes
    assert {s.activations for s in specs} == {"int8"}
    assert plan.summary().avg_weight_bits <= budget + 1e-6


def test_below_four_bits_uses_two_bit_quality_layers():
    from diffusers_mixdq.families import family_of

    unet = family_of("UNet2DConditionModel")
    plan = BitPlan.load(demo.plan_path("w3a8-mixed", "shapes-extra"))
    quality = {s.weights for n, s in plan.layer_specs().items() if not unet.role(n, "content")}
    assert "int2" in quality
