"""The demo model's extra plans (hub_recipes/demo-shapes-extra/, used by benchmarks/peers.py) fit it and keep
their budgets."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusers_mixdq import BitPlan, demo

EXTRA = Path(__file__).resolve().parent.parent / "hub_recipes" / "demo-shapes-extra"
#: plan -> (largest average weight bits, weight dtypes it may use)
BUDGETS = {
    "w5a8-mixed": (5.0, {"int2", "int4", "int8"}),
    "w4a8-uniform": (4.0, {"int4"}),
    "w3a8-mixed": (3.0, {"int2", "int4", "int8"}),
}


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_extra_plan_fits_the_demo_model(name):
    from diffusers_mixdq.cli import load_model_skeleton

    plan = BitPlan.load(EXTRA / name)
    unet = load_model_skeleton(demo.pipeline_path())
    assert plan.is_resolved and "bos.hidden_state" in plan.tensors
    assert plan.resolve(unet).layer_specs() == plan.layer_specs()
    specs = plan.layer_specs().values()
    budget, dtypes = BUDGETS[name]
    assert {s.weights for s in specs} <= dtypes
    assert {s.activations for s in specs} == {"int8"}
    assert plan.summary().avg_weight_bits <= budget + 1e-6


def test_below_four_bits_uses_two_bit_quality_layers():
    from diffusers_mixdq.builder.sensitivity import layer_group

    plan = BitPlan.load(EXTRA / "w3a8-mixed")
    quality = {s.weights for n, s in plan.layer_specs().items() if layer_group(n) == "quality"}
    assert "int2" in quality
